"""Thin adapter: the rule's name is the stage's name; named inputs, outputs and params are its arguments."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.stages import run_from_snakemake  # noqa: E402

run_from_snakemake(snakemake, snakemake.rule)  # noqa: F821 (injected by Snakemake)
