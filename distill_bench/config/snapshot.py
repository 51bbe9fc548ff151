"""The merged config and plan of a run, saved so a reader can tell exactly what produced the numbers."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from distill_bench.config.load import validate_config
from distill_bench.config.plan import build_plan
from distill_bench.atomic import atomic_write_text


def write_config_snapshot(config: dict, config_out: str | Path, plan_out: str | Path) -> None:
    cfg = validate_config(config)
    atomic_write_text(config_out, yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_text(plan_out, json.dumps(build_plan(cfg).to_dict(), indent=2, default=str))
