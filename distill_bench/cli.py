"""`distill-bench` command line: every subcommand imports its module lazily, so `--help` stays instant."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from distill_bench import __version__

# subcommand -> ("module:function taking argv", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "measure": ("distill_bench.energy.cli:measure_main", "measure the energy of any command (stage JSON)"),
    "idle": ("distill_bench.energy.cli:idle_main", "measure idle power per device"),
    "env": ("distill_bench.energy.cli:env_main", "write the environment snapshot"),
    "validate-config": ("distill_bench.config.cli:validate_main", "validate a workflow config and print the plan"),
    "stage": ("distill_bench.cli:stage_main", "run one workflow stage without Snakemake"),
    "rollup": ("distill_bench.report.cli:rollup_main", "roll stage JSONs up into the comparison table"),
    "forecast": ("distill_bench.forecast:forecast_main", "forecast each stage's time and kWh before queueing a run"),
    "compare": ("distill_bench.report.cli:compare_main", "compare several run directories"),
    "wandb": ("distill_bench.report.wandb_log:wandb_main", "log a finished run to Weights & Biases (offline by default)"),
}


def stage_main(argv: list[str]) -> int:
    from distill_bench.stages import STAGES, run_named_stage

    parser = argparse.ArgumentParser(
        prog="distill-bench stage",
        description="Run one stage inside the energy meter. Arguments are the stage function's keyword "
                    "arguments as KEY=VALUE (VALUE parsed as JSON when it parses, else kept as a string).")
    parser.add_argument("name", choices=sorted(STAGES))
    parser.add_argument("--energy-json", required=True, help="where the stage JSON goes")
    parser.add_argument("--stage-id", required=True)
    parser.add_argument("--role", default=None)
    parser.add_argument("--pipeline", default="shared")
    parser.add_argument("--experiment", default=None)
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--energy", default="{}", help="energy settings as JSON (policy, sample_interval_s, ...)")
    parser.add_argument("args", nargs="*", metavar="KEY=VALUE")
    # intermixed: KEY=VALUE pairs may come before, between or after the options (the README puts them last)
    ns = parser.parse_intermixed_args(argv)
    kwargs = {}
    for item in ns.args:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"argument {item!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    meter_args = {"stage_id": ns.stage_id, "role": ns.role, "pipeline": ns.pipeline,
                  "experiment": ns.experiment, "artifact": ns.artifact, "energy": json.loads(ns.energy)}
    run_named_stage(ns.name, out_json=ns.energy_json, meter_args=meter_args, kwargs=kwargs)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"distill-bench {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: distill-bench [--version] COMMAND [ARGS...]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<16} {text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"distill-bench: unknown command {name!r} (try --help)", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
