"""`distill-bench validate-config FILE`: the same validation the Snakefile runs, plus the expanded plan."""
from __future__ import annotations

import argparse


def validate_main(argv: list[str]) -> int:
    from distill_bench.config import ConfigError, build_plan, load_config

    parser = argparse.ArgumentParser(prog="distill-bench validate-config")
    parser.add_argument("config", nargs="?", default="workflow_config.yaml")
    ns = parser.parse_args(argv)
    try:
        plan = build_plan(load_config(ns.config))
    except ConfigError as err:
        parser.exit(2, f"{err}\n")
    print(f"{ns.config}: valid; {len(plan.experiments)} experiments, {len(plan.artifacts)} shared teacher "
          f"artifacts, {len(plan.eval_units)} evaluations, {len(plan.all_stage_ids())} metered stages")
    for exp in plan.experiments.values():
        art = f" <- {exp.artifact}" if exp.artifact else ""
        print(f"  {exp.id}{art}")
    return 0
