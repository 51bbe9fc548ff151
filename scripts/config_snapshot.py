"""Save the merged (validated, defaults filled) config and the run plan under results/config/."""
from distill_bench.config.snapshot import write_config_snapshot

write_config_snapshot(snakemake.params.config, snakemake.output.config, snakemake.output.plan)  # noqa: F821
