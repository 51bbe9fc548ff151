"""`distill-bench rollup RESULTS_DIR` and `distill-bench compare RUN_DIR RUN_DIR ...`."""
from __future__ import annotations

import argparse


def rollup_main(argv: list[str]) -> int:
    from distill_bench.report.reconcile import ReconciliationError
    from distill_bench.report.rollup import RollupError, rollup_run

    parser = argparse.ArgumentParser(prog="distill-bench rollup",
                                     description="Roll a run's stage JSONs up into results/summary/.")
    parser.add_argument("results_dir", nargs="?", default="results")
    ns = parser.parse_args(argv)
    try:
        rollup_run(ns.results_dir, print_table=True)
    except (RollupError, ReconciliationError, FileNotFoundError) as err:
        parser.exit(2, f"distill-bench rollup: {err}\n")
    return 0


def compare_main(argv: list[str]) -> int:
    from distill_bench.report.compare import compare_runs

    parser = argparse.ArgumentParser(prog="distill-bench compare",
                                     description="Join several runs' comparison tables into one table and plot.")
    parser.add_argument("runs", nargs="+", help="results directories (each holding summary/comparison.csv)")
    parser.add_argument("--out", default="comparison_of_runs", help="output directory")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: the run names)")
    ns = parser.parse_args(argv)
    if ns.labels and len(ns.labels) != len(ns.runs):
        parser.error(f"--labels needs one label per run ({len(ns.runs)}), got {len(ns.labels)}")
    try:
        table = compare_runs(ns.runs, ns.out, labels=ns.labels)
    except FileNotFoundError as err:
        parser.exit(2, f"distill-bench compare: {err}\n")
    print(table)
    return 0
