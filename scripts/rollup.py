"""Roll every stage JSON and eval result up into results/summary/ (comparison.csv/.md, stages.csv)."""
from distill_bench.report.rollup import rollup_run

# in_workflow: the run's start counters come from this run's onstart, never from an earlier run's snapshot
rollup_run(snakemake.params.results_dir, print_table=True, in_workflow=True)  # noqa: F821
