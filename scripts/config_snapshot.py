"""Save the merged (validated, defaults filled) config and the run plan under results/config/."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.config.snapshot import write_config_snapshot  # noqa: E402
from distill_bench.stages import log_to_rule_log  # noqa: E402

log = log_to_rule_log(snakemake)  # noqa: F821
write_config_snapshot(snakemake.params.config, snakemake.output.config, snakemake.output.plan)  # noqa: F821
log.info("wrote %s and %s", snakemake.output.config, snakemake.output.plan)  # noqa: F821
