"""Pre-flight: the one path from what the user passed (config file + ``--config`` overrides) to a validated config
and its plan. The Snakefile and ``distill-bench validate-config`` both call :func:`preflight`, so a config one
accepts the other accepts too, and every check runs before any job starts."""
from __future__ import annotations

import copy
from typing import Any, Mapping

import yaml

from distill_bench.config.load import ConfigError, _schema, validate_config
from distill_bench.config.plan import Plan, build_plan

# where the Snakefile leaves the meter settings in the config the stage adapter sees (distill_bench.stages)
METER_SETTINGS_KEY = "_meter_settings"


def _coerce(value: Any, schema: dict, root: dict) -> Any:
    """Parse a string the schema wants as a number, boolean, null, list or mapping (what ``--config`` hands over for
    nested values: ``training={token_budget: 20000}`` arrives as ``{'token_budget': '20000'}``)."""
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    if isinstance(value, str):
        wanted = schema.get("type")
        wanted = set(wanted if isinstance(wanted, list) else [wanted] if wanted else [])
        for alt in schema.get("anyOf", []) + schema.get("oneOf", []):
            t = alt.get("type")
            wanted |= set(t if isinstance(t, list) else [t] if t else [])
        if wanted and "string" not in wanted:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                return value
            if isinstance(parsed, str) and "number" in wanted:   # YAML 1.1 reads '1e-3' as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            kinds = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None), "array": list,
                     "object": dict}
            if any(isinstance(parsed, kinds[w]) and not (w in ("integer", "number") and isinstance(parsed, bool))
                   for w in wanted if w in kinds):
                value = parsed
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {k: _coerce(v, props.get(k, extra if isinstance(extra, dict) else {}), root) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_coerce(v, schema["items"], root) for v in value]
    return value


def coerce_to_schema(config: Mapping[str, Any]) -> dict:
    """``config`` with strings parsed where the schema expects another type; everything else unchanged."""
    schema = _schema()
    return _coerce(copy.deepcopy(dict(config)), schema, schema)


def preflight(config: Mapping[str, Any], source: str = "the workflow config") -> tuple[dict, Plan]:
    """Validate ``config`` (coerced through the schema, hardware preset applied, partitions checked) and expand
    its plan; raise ConfigError (or HardwareError) naming the key, before any job runs."""
    from distill_bench.hardware import apply_preset, check_partitions


    if isinstance(config, Mapping):   # the Snakefile's own note to the stage adapter, never user input
        config = {k: v for k, v in config.items() if k != METER_SETTINGS_KEY}
    if not isinstance(config, Mapping) or not config.get("experiments"):
        raise ConfigError(f"config key 'experiments': missing or empty in {source}; a config passed with "
                          f"--configfile replaces the embedded default (workflow_config.yaml, which plain "
                          f"`snakemake` loads through profiles/default), so it must list its experiments")
    cfg = apply_preset(validate_config(coerce_to_schema(config)))
    check_partitions(cfg)
    # kd.top_k of every resolved experiment (top level, overrides, grids) is checked by validate_config
    return cfg, build_plan(cfg)
