"""Validation of the files this package writes against the schemas it ships."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_SCHEMA_DIR = Path(__file__).with_name("schema")


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema

    schema = json.loads((_SCHEMA_DIR / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate_dict(d: Any, kind: str, source: str = "<dict>") -> None:
    """Raise ValueError naming ``source`` and the JSON path of the first problem."""
    if isinstance(d, dict):
        version = d.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise ValueError(f"{source}: schema_version {version} is newer than this distill-bench understands "
                             f"({SCHEMA_VERSION}); upgrade distill-bench to read it")
    errors = sorted(_validator(kind).iter_errors(d), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(f"{source}: invalid {kind} JSON at {where}: {e.message}{more}")


def validate_stage_dict(d: dict, source: str = "<dict>") -> None:
    validate_dict(d, "stage", source)


def load_json(path: str | Path, kind: str) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} JSON not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    validate_dict(d, kind, str(path))
    return d


def load_stage_json(path: str | Path) -> dict:
    return load_json(path, "stage")
