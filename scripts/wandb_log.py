"""Log the finished run to Weights & Biases (report.wandb); the run directories go to the output list."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.atomic import atomic_write_text  # noqa: E402
from distill_bench.report.wandb_log import log_from_config  # noqa: E402
from distill_bench.stages import log_to_rule_log  # noqa: E402

log = log_to_rule_log(snakemake)  # noqa: F821
# W&B logs a whole finished results directory: the one holding the plan this rule declares as input
results_dir = Path(snakemake.input.plan).parent.parent  # noqa: F821
runs = log_from_config(results_dir, snakemake.params.config)  # noqa: F821
atomic_write_text(snakemake.output[0], "".join(f"{r}\n" for r in runs))  # noqa: F821
log.info("logged %d W&B run(s) from %s", len(runs), results_dir)
