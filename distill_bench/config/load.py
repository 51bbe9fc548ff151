"""Load and validate the workflow config, naming the offending key path in every error."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema
import yaml

from distill_bench.defaults import schema as _schema
from distill_bench.defaults import training_conflicts
from distill_bench.refs import missing_local_path

SECTIONS = ("training", "kd", "synthetic", "eval", "dpo", "selfdistill")


class ConfigError(ValueError):
    """A workflow config problem; the message names the key path."""


def _validator_with_defaults(schema: dict):
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if prop not in instance and "default" in sub:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, subschema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def _key_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _known_keys(schema: dict, root: dict, path: list) -> list[str]:
    node = schema
    for part in path:
        if "$ref" in node:
            node = _resolve_ref(root, node["$ref"])
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            node = node.get("additionalProperties", {}) if isinstance(node.get("additionalProperties"), dict) else {}
    if "$ref" in node:
        node = _resolve_ref(root, node["$ref"])
    return sorted(node.get("properties", {}))


def _resolve_ref(root: dict, ref: str) -> dict:
    node = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _format_error(err: jsonschema.ValidationError, schema: dict) -> str:
    path = list(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in allowed]
        known = _known_keys(schema, schema, path)
        msgs = []
        for key in extra:
            hint = difflib.get_close_matches(key, known, n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            msgs.append(f"config key '{_key_path(path + [key])}': unknown key{did}; "
                        f"allowed here: {', '.join(known) or 'none'}")
        return "\n".join(msgs)
    if err.validator == "required":
        return f"config key '{_key_path(path)}': {err.message}"
    if err.validator == "propertyNames":
        return f"config key '{_key_path(path)}': invalid name {err.instance!r} ({err.message})"
    return f"config key '{_key_path(path)}': {err.message}"


def validate_config(config: Mapping[str, Any]) -> dict:
    """Return a validated deep copy of ``config`` with defaults filled; raise ConfigError naming every bad key."""
    schema = _schema()
    cfg = copy.deepcopy(dict(config))
    validator = _validator_with_defaults(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        raise ConfigError("invalid workflow config:\n  " + "\n  ".join(_format_error(e, schema) for e in errors))
    section_defs = schema["$defs"]
    for index, exp in enumerate(cfg["experiments"]):
        for section, override in (exp.get("overrides") or {}).items():
            _check_partial(section_defs[section], override, f"experiments[{index}].overrides.{section}", schema)
        for dotted, values in (exp.get("grid") or {}).items():
            section, _, leaf = dotted.partition(".")
            props = section_defs[section]["properties"]
            top = leaf.split(".")[0]
            if top not in props:
                hint = difflib.get_close_matches(top, list(props), n=1)
                did = f" (did you mean '{section}.{hint[0]}'?)" if hint else ""
                raise ConfigError(f"config key 'experiments[{index}].grid.{dotted}': '{section}' has no key "
                                  f"'{top}'{did}")
            for value in values:
                _check_partial(section_defs[section], _nest(leaf, value),
                               f"experiments[{index}].grid.{dotted}", schema)
    _semantic_checks(cfg)
    return _canonical(cfg)


def _canonical(value: Any) -> Any:
    """Mappings with sorted keys, recursively (lists keep their order).

    Snakemake compares rule params by their repr, which follows key order: without this, reformatting or
    re-dumping a YAML file (same values, other key order) would look like a parameter change and rerun jobs.
    """
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _check_partial(section_schema: dict, partial: Any, where: str, root: dict) -> None:
    sub = copy.deepcopy(section_schema)
    sub.pop("required", None)
    sub["$defs"] = root["$defs"]
    validator = jsonschema.Draft202012Validator(sub)
    errors = list(validator.iter_errors(partial))
    if errors:
        lines = []
        for err in errors:
            text = _format_error(err, sub).replace("config key '", f"config key '{where}.", 1)
            lines.append(text.replace(f"{where}.<root>", where))
        raise ConfigError("invalid workflow config:\n  " + "\n  ".join(lines))


def _path_problem(key: str, what: str, ref: str) -> list[str]:
    """A local path that does not exist, named before any job runs (distill_bench.refs has the rule)."""
    if missing_local_path(ref):
        return [f"config key '{key}': {what} path {ref!r} does not exist (local: absolute, ./ or ../, or an "
                f"existing relative path; hub ids look like 'name' or 'owner/name')"]
    return []


def _semantic_checks(cfg: dict) -> None:
    problems: list[str] = []
    datasets, students = cfg["datasets"], cfg["students"]
    for name, spec in datasets.items():
        key = f"datasets.{name}"
        if spec["source"] == "embedded":
            if spec.get("path"):
                problems.append(f"config key '{key}.path': the embedded task is generated, it takes no path")
            task = spec.get("task", {})
            if task.get("min_steps", 2) > task.get("max_steps", 3):
                problems.append(f"config key '{key}.task.min_steps': larger than max_steps")
        else:
            path = spec.get("path")
            if not path:
                problems.append(f"config key '{key}.path': source '{spec['source']}' needs an HF dataset id or a "
                                f"local path")
            else:
                problems += _path_problem(f"{key}.path", "dataset", path)
    teacher = cfg["teacher"]
    if teacher["source"] == "train":
        if "arch" not in teacher:
            problems.append("config key 'teacher.arch': needed when teacher.source is 'train'")
        tds = teacher["train"].get("dataset")
        if tds is not None and tds not in datasets:
            problems.append(f"config key 'teacher.train.dataset': unknown dataset {tds!r}; known: {sorted(datasets)}")
    else:
        problems += _model_ref_problems("teacher.name_or_path", teacher.get("name_or_path"))
    problems += _model_tokenizer_problems("teacher", teacher, teacher["source"] == "pretrained")
    for name, spec in students.items():
        key = f"students.{name}"
        if spec["init"] == "scratch" and "arch" not in spec:
            problems.append(f"config key '{key}.arch': needed when init is 'scratch'")
        if spec["init"] == "pretrained":
            problems += _model_ref_problems(f"{key}.name_or_path", spec.get("name_or_path"))
        problems += _model_tokenizer_problems(key, spec, spec["init"] == "pretrained")
    tok = cfg["tokenizer"]["source"]
    if tok != "train":
        problems += _path_problem("tokenizer.source", "tokenizer", tok)
    for index, exp in enumerate(cfg["experiments"]):
        for field, known in (("students", students), ("datasets", datasets)):
            for item in exp[field]:
                if item not in known:
                    hint = difflib.get_close_matches(item, list(known), n=1)
                    did = f" (did you mean {hint[0]!r}?)" if hint else ""
                    problems.append(f"config key 'experiments[{index}].{field}': unknown {field[:-1]} "
                                    f"{item!r}{did}; defined: {sorted(known)}")
    problems += _top_k_problems(cfg)
    problems += _training_conflict_problems(cfg)
    for index, value in enumerate(cfg["seeds"]):
        if not isinstance(value, int) or isinstance(value, bool):   # the schema lets 1.0 pass as an integer
            problems.append(f"config key 'seeds[{index}]': {value!r} is not an integer")
    if problems:
        raise ConfigError("invalid workflow config:\n  " + "\n  ".join(problems))


def _model_tokenizer_problems(key: str, spec: Mapping[str, Any], pretrained: bool) -> list[str]:
    """A per-model tokenizer belongs to a pretrained model; one built from an arch uses tokenizer.source."""
    tok = spec.get("tokenizer")
    if not tok:
        return []
    if not pretrained:
        return [f"config key '{key}.tokenizer': only a pretrained model takes its own tokenizer; a model built "
                f"from an arch uses tokenizer.source"]
    return _path_problem(f"{key}.tokenizer", "tokenizer", tok)


def _top_k_problems(cfg: dict) -> list[str]:
    """kd.top_k against the trained tokenizer's vocabulary, at the top level, in overrides and in grids (a
    pretrained tokenizer's real size is checked where the logit cache is built)."""
    if cfg["tokenizer"]["source"] != "train":
        return []
    vocab = cfg["tokenizer"]["vocab_size"]
    candidates = [("kd.top_k", cfg["kd"]["top_k"])]
    for index, exp in enumerate(cfg["experiments"]):
        override = ((exp.get("overrides") or {}).get("kd") or {}).get("top_k")
        if override is not None:
            candidates.append((f"experiments[{index}].overrides.kd.top_k", override))
        for value in (exp.get("grid") or {}).get("kd.top_k") or []:
            candidates.append((f"experiments[{index}].grid.kd.top_k", value))
    return [f"config key '{key}': {value} exceeds tokenizer.vocab_size {vocab}"
            for key, value in candidates if value > vocab]


def _training_conflict_problems(cfg: dict) -> list[str]:
    """Training values an FSDP launch or the precision cannot run (defaults.training_conflicts): at the top level,
    then as each experiment resolves them (its overrides.training, each value of a training.* grid) where that adds
    one."""
    top = cfg["training"]
    seen = {key for key, _ in training_conflicts(top)}
    problems = [f"config key 'training.{key}': {why}" for key, why in training_conflicts(top)]
    for index, exp in enumerate(cfg["experiments"]):
        merged = {**top, **((exp.get("overrides") or {}).get("training") or {})}
        variants = [(f"experiments[{index}].overrides.training", merged)]
        for dotted, values in (exp.get("grid") or {}).items():
            section, _, key = dotted.partition(".")
            if section == "training" and key in merged:
                variants += [(f"experiments[{index}].grid.{dotted}", {**merged, key: v}) for v in values]
        for where, training in variants:
            for key, why in training_conflicts(training):
                if key not in seen:
                    seen.add(key)
                    problems.append(f"config key '{where}': training.{key} {why}")
    return problems


def _model_ref_problems(key: str, ref: str | None) -> list[str]:
    if not ref:
        return [f"config key '{key}': needed (an HF model id or a local model directory)"]
    return _path_problem(key, "model", ref)


def load_config(path_or_dict: str | Path | Mapping[str, Any]) -> dict:
    if isinstance(path_or_dict, Mapping):
        return validate_config(path_or_dict)
    path = Path(path_or_dict)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return validate_config(data)
