"""Log the finished run to Weights & Biases (report.wandb); the run directories go to the output list."""
from distill_bench.energy import atomic_write_text
from distill_bench.report.wandb_log import log_from_config

runs = log_from_config(snakemake.params.results_dir, snakemake.params.config)  # noqa: F821
atomic_write_text(snakemake.output[0], "".join(f"{r}\n" for r in runs))  # noqa: F821
