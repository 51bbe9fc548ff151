"""Thin adapter: the rule's name is the stage's name; named inputs, outputs and params are its arguments."""
from distill_bench.stages import run_from_snakemake

run_from_snakemake(snakemake, snakemake.rule)  # noqa: F821 (injected by Snakemake)
