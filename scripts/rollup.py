"""Roll every stage JSON and eval result up into results/summary/ (comparison.csv/.md, stages.csv)."""
from distill_bench.report.rollup import rollup_run

rollup_run(snakemake.params.results_dir, print_table=True)  # noqa: F821
