"""Every default of the package, read from the one place it is written: ``config/workflow.schema.yaml``.

The workflow fills a config's defaults from the schema when it validates it; the settings objects (``TrainSettings``,
the ``dpo`` section, ``EnergySettings``, ``GenerationSettings``, synthetic decoding and filters, ``eval``, W&B) take
theirs from here too, so ``distill-bench stage``, the benchmarks and the workflow train and generate the same from
the same words. ``tests/test_defaults.py`` proves the settings objects and the schema cannot disagree.

A leaf module (PyYAML only): the energy layer below the config package reads it as well.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).with_name("config") / "workflow.schema.yaml"
# config keys that choose a kernel, not a computation (the same math, rounded differently in bf16, like any other
# kernel choice): no artifact or model identity holds them
KERNEL_KEYS = ("hf_prefill",)
# training values that FSDP over several processes cannot run, and why: the config check (before any job) and
# TrainSettings refuse them with these words
NOT_WITH_SHARDING = {
    ("torch_compile", "layers"): "each decoder layer would be compiled before FSDP shards it, which measured no "
                                 "faster and diverged in its one 2-GPU run (docs/BENCHMARKS.md); use auto (no "
                                 "compile under FSDP) or none",
    ("optim", "adamw_fused_clip"): "it clips by the local gradient norm, and FSDP's gradients are sharded; use "
                                   "adamw_torch_fused",
    ("optim", "adamw_compiled_clip"): "it clips by the local gradient norm, and FSDP's gradients are sharded; use "
                                      "adamw_torch_fused",
}


def is_sharded(distributed: str, processes: int) -> bool:
    """Whether training shards its parameters across processes (FSDP with more than one)."""
    return distributed == "fsdp" and processes > 1


# training values that fp16 training cannot run, and why (refused in the same two places)
NOT_WITH_FP16 = {
    ("optim", "adamw_fused_clip"): "fp16's loss scaler hands fused AdamW its grad_scale, the hook the folded clip "
                                   "also uses; use precision bf16, or optim auto",
    ("optim", "adamw_compiled_clip"): "fp16's loss scaler unscales the gradients inside its step, after the folded "
                                      "clip has taken their norm; use precision bf16, or optim auto",
}


def training_conflicts(training: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, "'value' with ... : why") for each value of a filled ``training`` section that its FSDP launch or its
    precision cannot run."""
    found = [(key, f"{value!r} with training.precision fp16: {why}")
             for (key, value), why in NOT_WITH_FP16.items()
             if training["precision"] == "fp16" and training[key] == value]
    processes = training["gpus"] * training["nodes"]
    if is_sharded(training["distributed"], processes):
        found += [(key, f"{value!r} with training.distributed fsdp on {processes} processes: {why}")
                  for (key, value), why in NOT_WITH_SHARDING.items() if training[key] == value]
    return found


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def schema() -> dict[str, Any]:
    """The workflow config schema (a fresh copy: callers may extend it)."""
    return copy.deepcopy(_schema())


def _section_schema(name: str) -> dict[str, Any]:
    """A section's schema: ``$defs/<name>`` (training, kd, dpo, generation...) or a top-level property (energy)."""
    root = _schema()
    node = root["$defs"].get(name) or root["properties"].get(name)
    if node is None:
        raise KeyError(f"workflow.schema.yaml has no section {name!r}")
    return node


def _defaults_of(node: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, sub in node.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            out[key] = _defaults_of(sub)
        elif "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
    return out


def section_defaults(name: str, *path: str) -> dict[str, Any]:
    """Defaults of every key of a section (nested objects as dicts of their own defaults), e.g.
    ``section_defaults("training")`` or ``section_defaults("synthetic", "filters")``."""
    node = _section_schema(name)
    for part in path:
        node = node["properties"][part]
    return _defaults_of(node)


def allowed_values(name: str, key: str) -> tuple[Any, ...]:
    """The ``enum`` of ``<section>.<key>``: the values a settings object accepts."""
    return tuple(_section_schema(name)["properties"][key]["enum"])


def top_level_default(key: str) -> Any:
    """The default of a top-level config key (``seed``, ``seeds``, ``run_name``...)."""
    return copy.deepcopy(_schema()["properties"][key]["default"])
