"""Hardware/software snapshot of the run (GPUs, driver, CPU, package versions, git commit, SLURM variables)."""
from distill_bench.energy import write_environment_snapshot

write_environment_snapshot(snakemake.output[0])  # noqa: F821
