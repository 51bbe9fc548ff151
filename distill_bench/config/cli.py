"""`distill-bench validate-config FILE`: the same validation the Snakefile runs, plus the expanded plan."""
from __future__ import annotations

import argparse


def validate_main(argv: list[str]) -> int:
    from pathlib import Path

    import yaml

    from distill_bench.config import ConfigError
    from distill_bench.config.preflight import preflight
    from distill_bench.hardware import HardwareError

    parser = argparse.ArgumentParser(prog="distill-bench validate-config")
    parser.add_argument("config", nargs="?", default="workflow_config.yaml")
    ns = parser.parse_args(argv)
    try:
        path = Path(ns.config)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        _, plan = preflight(raw if raw is not None else {}, f"config file {str(path)!r}")
    except (ConfigError, HardwareError) as err:
        parser.exit(2, f"{err}\n")
    print(f"{ns.config}: valid; {len(plan.experiments)} experiments, {len(plan.artifacts)} shared teacher "
          f"artifacts, {len(plan.eval_units)} evaluations, {len(plan.all_stage_ids())} metered stages")
    for exp in plan.experiments.values():
        art = f" <- {exp.artifact}" if exp.artifact else ""
        art += f" + {exp.tail_artifact}" if exp.tail_artifact else ""
        print(f"  {exp.id}{art}")
    return 0
