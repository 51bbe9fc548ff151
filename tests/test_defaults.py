"""Every default lives once, in distill_bench/config/workflow.schema.yaml: the settings objects (training, DPO,
energy, generation, synthetic decoding and filters, eval, W&B, KD) take theirs from it, so the workflow, direct
`distill-bench stage` calls and the benchmarks build the same settings from the same words."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from distill_bench.config import load_config
from distill_bench.config import build_plan
from distill_bench.defaults import allowed_values, schema, section_defaults, top_level_default
from distill_bench.dpo.config import DEFAULTS as DPO_DEFAULTS
from distill_bench.dpo.config import normalize_dpo
from distill_bench.energy.settings import EnergySettings
from distill_bench.eval.common import parse_eval_config
from distill_bench.generation.settings import GenerationSettings
from distill_bench.report.wandb_log import WANDB_CONFIG_DEFAULTS
from distill_bench.synthetic.ids import DECODING_DEFAULTS, FILTER_DEFAULTS, NEUTRAL_KEYS
from distill_bench.train.trainer import OPTIMIZERS, SCHEDULERS, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
# fields that wire a settings object into the workflow (file paths), not config keys with a default
WIRING = {EnergySettings: {"idle_json", "environment_json"}}
# config keys that configure something other than the object (the idle-baseline rule, the roll-up, the scheduler)
ELSEWHERE = {EnergySettings: {"idle_seconds", "accept_shared_devices", "exclusive_gpus"}}
DATACLASSES = [(TrainSettings, "training"), (EnergySettings, "energy"), (GenerationSettings, "generation")]


def field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in WIRING.get(cls, set())}


@pytest.mark.parametrize("cls, section", DATACLASSES, ids=[c.__name__ for c, _ in DATACLASSES])
def test_dataclass_defaults_are_the_schema_defaults(cls, section):
    want = {k: v for k, v in section_defaults(section).items() if k not in ELSEWHERE.get(cls, set())}
    have = field_defaults(cls)
    assert sorted(have) == sorted(want), f"{cls.__name__} fields and schema section '{section}' keys differ"
    drift = {k: (have[k], want[k]) for k in want if have[k] != want[k] or type(have[k]) is not type(want[k])}
    assert not drift, f"{cls.__name__} defaults (dataclass, schema) disagree: {drift}"


def test_section_defaults_of_the_dict_based_settings_are_the_schema_defaults():
    assert DPO_DEFAULTS == section_defaults("dpo") and normalize_dpo({}) == section_defaults("dpo")
    synthetic = section_defaults("synthetic")
    assert set(synthetic) == set(DECODING_DEFAULTS) | set(NEUTRAL_KEYS) | {"filters"}
    assert DECODING_DEFAULTS == {k: synthetic[k] for k in DECODING_DEFAULTS}
    assert FILTER_DEFAULTS == synthetic["filters"]
    assert parse_eval_config({}) == section_defaults("eval")
    assert WANDB_CONFIG_DEFAULTS == section_defaults("report", "wandb")


def test_allowed_values_come_from_the_schema():
    assert SCHEDULERS == allowed_values("training", "lr_scheduler")
    for scheduler in SCHEDULERS:   # every scheduler the schema offers runs without extra arguments
        TrainSettings.from_dict({"lr_scheduler": scheduler})
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainSettings.from_dict({"lr_scheduler": "cosine_with_min_lr"})   # needs min_lr, which is not a key


def test_settings_modules_write_no_literal_default():
    """Structural guard: a literal field default in a settings dataclass (``lr: float = 3e-3``) would be a second
    source; only the wiring fields (paths set by the workflow) may have one."""
    files = {TrainSettings: "distill_bench/train/trainer.py", EnergySettings: "distill_bench/energy/settings.py",
             GenerationSettings: "distill_bench/generation/settings.py"}
    for cls, rel in files.items():
        tree = ast.parse((ROOT / rel).read_text())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        literal = [f.target.id for f in node.body if isinstance(f, ast.AnnAssign) and f.value is not None
                   and isinstance(f.value, ast.Constant) and f.target.id not in WIRING.get(cls, set())]
        assert not literal, f"{rel}: {cls.__name__} fields {literal} have literal defaults; read them from the schema"


def test_workflow_and_direct_calls_build_the_same_training_settings():
    """A config that leaves `training` empty trains exactly like a direct call with no training keys."""
    cfg = load_config({"datasets": {"a": {"source": "embedded"}}, "students": {"s": {"arch": {
        "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}}},
        "teacher": {"arch": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "experiments": [{"pipeline": "sft_gt", "students": ["s"], "datasets": ["a"]}]})
    assert TrainSettings.from_dict(cfg["training"]) == TrainSettings.from_dict({}) == TrainSettings()
    assert normalize_dpo(cfg["dpo"]) == normalize_dpo({})
    assert EnergySettings.from_dict(cfg["energy"]) == EnergySettings()


def test_schema_accepts_every_training_setting():
    """The schema must not reject a key the trainer takes (max_grad_norm is part of the run fingerprint)."""
    keys = set(schema()["$defs"]["training"]["properties"])
    assert {f.name for f in dataclasses.fields(TrainSettings)} == keys
    cfg = load_config({"datasets": {"a": {"source": "embedded"}}, "students": {"s": {"arch": {
        "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}}},
        "teacher": {"arch": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "training": {"max_grad_norm": 0.5, "logging_steps": 5, "num_threads": 2, "lr_scheduler": "polynomial"},
        "experiments": [{"pipeline": "sft_gt", "students": ["s"], "datasets": ["a"]}]})
    s = TrainSettings.from_dict(cfg["training"])
    assert (s.max_grad_norm, s.logging_steps, s.num_threads, s.lr_scheduler) == (0.5, 5, 2, "polynomial")


def test_optimizers_and_seeds_come_from_the_schema():
    """training.optim's choices are the schema's enum; a config without `seeds` trains each student once per the
    schema's default seeds (the experiment ids carry them)."""
    assert OPTIMIZERS == allowed_values("training", "optim")
    for optim in OPTIMIZERS:
        TrainSettings.from_dict({"optim": optim})
    with pytest.raises(ValueError, match="training.optim"):
        TrainSettings.from_dict({"optim": "sgd"})
    cfg = load_config({"datasets": {"a": {"source": "embedded"}}, "students": {"s": {"arch": {
        "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}}},
        "teacher": {"arch": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "experiments": [{"pipeline": "sft_gt", "students": ["s"], "datasets": ["a"]}]})
    assert cfg["seeds"] == top_level_default("seeds")
    assert sorted(build_plan(cfg).experiments) == [f"sft_gt.s.a.s{seed}" for seed in top_level_default("seeds")]


def _schema_keys_with_defaults() -> set[str]:
    root = schema()
    keys: set[str] = set()

    def walk(node: dict) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if "default" in sub:
                keys.add(key)
            if "properties" in sub:
                walk(sub)

    walk(root)
    for section in root["$defs"].values():
        walk(section)
    return keys


@pytest.mark.parametrize("rel", ["distill_bench/forecast.py", "distill_bench/report/rollup.py",
                                 "distill_bench/report/stats.py", "distill_bench/report/reconcile.py"])
def test_forecast_and_report_read_no_literal_config_default(rel):
    """Structural guard: ``eval_cfg.get("bootstrap_samples", 1000)`` in the roll-up or ``tr.get("gpus", 1)`` in the
    forecast would be a second source of a config default; they read the validated config or the schema's defaults."""
    keys = _schema_keys_with_defaults()
    tree = ast.parse((ROOT / rel).read_text())
    literal = sorted({node.args[0].value for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr == "get" and len(node.args) == 2
                      and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys
                      and isinstance(node.args[1], ast.Constant) and node.args[1].value is not None})
    assert not literal, f"{rel}: config keys {literal} read with a literal default; take the schema's"
