"""Hardware/software snapshot of the run (GPUs, driver, CPU, package versions, git commit, SLURM variables)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.energy import write_environment_snapshot  # noqa: E402
from distill_bench.stages import log_to_rule_log  # noqa: E402

log = log_to_rule_log(snakemake)  # noqa: F821
write_environment_snapshot(snakemake.output[0])  # noqa: F821
log.info("wrote %s", snakemake.output[0])  # noqa: F821
