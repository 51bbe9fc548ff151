"""A stage's identity (id, role, energy JSON, log) is derived in one place: the plan's STAGE_IDS names each stage
rule's job, rules/common.smk names its files after it, the adapter reads the id back from the energy JSON and the
role from the stage registry, and the roll-up charges by the same ids."""
from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from distill_bench.config import build_plan, load_config
from distill_bench.config.plan import STAGE_IDS, stage_id, stage_id_from_energy_json
from distill_bench.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
RULE_TEXT = {p.name: p.read_text() for p in (ROOT / "rules").glob("*.smk")}


def rule_blocks() -> dict[str, str]:
    blocks = {}
    for text in RULE_TEXT.values():
        for m in re.finditer(r"^(?:local)?rule (\w+):\n(.*?)(?=^\S|\Z)", text, re.S | re.M):
            blocks[m.group(1)] = m.group(2)
    return blocks


def test_every_stage_rule_has_one_identity_and_a_registry_role():
    assert set(STAGE_IDS) == set(STAGES), "stage rules and the stage registry must name the same stages"
    blocks = rule_blocks()
    for rule in STAGE_IDS:
        body = blocks[rule]
        wildcards = {f for _, f, _, _ in string.Formatter().parse(STAGE_IDS[rule]) if f}
        for key in wildcards:
            assert "{{" + key + "}}" in body, f"rule {rule}: stage id wildcard {key} is not one of its outputs' wildcards"
        assert f'energy_json=stage_energy_json("{rule}")' in body
        assert f'stage_log("{rule}")' in body and f'stage_benchmark("{rule}")' in body
        assert not re.search(r"^\s+(stage_id|role)=", body, re.M), f"rule {rule} spells its stage id or role"


def test_no_helper_function_lives_in_a_rule_file():
    for name, text in RULE_TEXT.items():
        if name != "common.smk":
            assert not re.search(r"^def ", text, re.M), f"rules/{name} defines a function (helpers: rules/common.smk)"


def test_every_rule_names_the_conda_environment():
    for rule, body in rule_blocks().items():
        if "script:" in body:
            assert "conda:" in body and "CONDA_ENV" in body, f"rule {rule} has no conda environment"


def test_energy_json_name_gives_back_the_stage_id_the_plan_lists():
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml")
    plan = build_plan(cfg)
    patterns = [re.compile("^" + re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(p)) + "$") for p in STAGE_IDS.values()]
    for sid in plan.all_stage_ids():
        assert stage_id_from_energy_json(f"results/energy/{sid}.json") == sid
        assert any(p.match(sid) for p in patterns), f"{sid} matches no STAGE_IDS pattern"
    assert stage_id("train_student", exp="kd.tiny.arith") == "student.train.kd.tiny.arith"
    with pytest.raises(ValueError, match=r"\.json"):
        stage_id_from_energy_json("results/energy/x.yaml")


class _Section(dict):
    """Stand-in for Snakemake's named lists (items(), keys(), [key], attribute access)."""

    def __getattr__(self, key):
        return self[key]


class _FakeSnakemake:
    def __init__(self, tmp_path):
        self.rule = "train_student"
        self.input = _Section(idle=str(tmp_path / "energy" / "idle.json"), environment=str(tmp_path / "env.json"),
                              dataset="d")
        self.output = _Section(energy_json=str(tmp_path / "energy" / "student.train.kd.tiny.arith.json"))
        self.params = _Section(energy={"policy": "measured"}, experiment="kd.tiny.arith", seed=1)
        self.log = [str(tmp_path / "logs" / "student.train.kd.tiny.arith.log")]
        self.threads = 1
        self.resources = _Section()   # no GPU asked for: no lease


def test_adapter_reads_the_id_from_the_energy_json_and_the_meter_files_from_the_inputs(tmp_path, monkeypatch):
    import distill_bench.stages as stages

    seen = {}
    monkeypatch.setattr(stages, "run_named_stage", lambda name, **kw: seen.update(name=name, **kw))
    sm = _FakeSnakemake(tmp_path)
    stages.run_from_snakemake(sm, sm.rule)
    meter = seen["meter_args"]
    assert meter["stage_id"] == "student.train.kd.tiny.arith" and "role" not in meter   # role: the registry's
    assert meter["energy"] == {"policy": "measured", "idle_json": sm.input.idle,
                               "environment_json": sm.input.environment}
    assert seen["kwargs"] == {"dataset": "d", "seed": 1}
    assert (tmp_path / "logs" / "student.train.kd.tiny.arith.log").is_file()   # the declared log is written to


def test_the_prefill_kernel_setting_changes_no_artifact_or_experiment_id():
    import yaml

    raw = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    plain = build_plan(load_config(raw))
    for section in ("synthetic", "dpo", "eval"):
        raw.setdefault(section, {})["hf_prefill"] = "packed"
    packed = build_plan(load_config(raw))
    assert {s: packed.config[s]["hf_prefill"] for s in ("synthetic", "dpo", "eval")} == \
        dict.fromkeys(("synthetic", "dpo", "eval"), "packed")
    assert sorted(packed.artifacts) == sorted(plain.artifacts)
    assert sorted(packed.experiments) == sorted(plain.experiments)
    assert packed.all_stage_ids() == plain.all_stage_ids()
