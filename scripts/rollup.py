"""Roll every stage JSON and eval result up into results/summary/ (comparison.csv/.md, stages.csv)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.report.rollup import rollup_run  # noqa: E402
from distill_bench.stages import log_to_rule_log  # noqa: E402

log = log_to_rule_log(snakemake)  # noqa: F821
# in_workflow: the run's start counters come from this run's onstart, never from an earlier run's snapshot
table = rollup_run(snakemake.params.results_dir, print_table=True, in_workflow=True)  # noqa: F821
log.info("rolled up %d experiments into %s", len(table), snakemake.output.csv)  # noqa: F821
