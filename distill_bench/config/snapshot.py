"""The merged config and plan of a run, saved so a reader can tell exactly what produced the numbers."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from distill_bench.config.load import validate_config
from distill_bench.config.plan import build_plan


def _atomic_write(path: str | Path, text: str) -> None:
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_config_snapshot(config: dict, config_out: str | Path, plan_out: str | Path) -> None:
    cfg = validate_config(config)
    _atomic_write(config_out, yaml.safe_dump(cfg, sort_keys=False))
    _atomic_write(plan_out, json.dumps(build_plan(cfg).to_dict(), indent=2, default=str))
