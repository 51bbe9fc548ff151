"""Config validation names the bad key before any job runs; the grid expands into the plan the DAG and roll-up share."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from distill_bench.config import ConfigError, build_plan, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded() -> dict:
    with open(ROOT / "workflow_config.yaml") as fh:
        return yaml.safe_load(fh)


def _with(cfg: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(cfg)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


BAD_CONFIGS = [
    # (description, mutation, key path that must appear in the message)
    ("unknown top-level key", lambda c: _with(c, "trainig", {}), "trainig"),
    ("typo inside a section", lambda c: _with(c, "training.lrr", 0.1), "training.lrr"),
    ("wrong type", lambda c: _with(c, "training.token_budget", "lots"), "training.token_budget"),
    ("negative budget", lambda c: _with(c, "training.token_budget", -5), "training.token_budget"),
    ("unknown energy policy", lambda c: _with(c, "energy.policy", "guess"), "energy.policy"),
    ("non-positive sampling interval", lambda c: _with(c, "energy.sample_interval_s", 0), "energy.sample_interval_s"),
    ("unknown pipeline", lambda c: _with(c, "experiments.0.pipeline", "magic"), "experiments[0].pipeline"),
    ("experiment names an unknown student", lambda c: _with(c, "experiments.0.students", ["huge"]),
     "experiments[0].students"),
    ("experiment names an unknown dataset", lambda c: _with(c, "experiments.1.datasets", ["gsm9k"]),
     "experiments[1].datasets"),
    ("grid over a key that does not exist", lambda c: _with(c, "experiments.1.grid", {"kd.temprature": [1.0]}),
     "experiments[1].grid.kd.temprature"),
    ("grid value of the wrong type", lambda c: _with(c, "experiments.1.grid", {"kd.alpha": [2.0]}),
     "experiments[1].grid.kd.alpha"),
    ("override with an unknown key", lambda c: _with(c, "experiments.0.overrides", {"training": {"epochs": 3}}),
     "experiments[0].overrides.training.epochs"),
    ("alpha out of range", lambda c: _with(c, "kd.alpha", 1.5), "kd.alpha"),
    ("empty seed list", lambda c: _with(c, "seeds", []), "seeds"),
    ("duplicate seeds", lambda c: _with(c, "seeds", [1, 2, 1]), "seeds"),
    ("non-integer seed", lambda c: _with(c, "seeds", [1, 2.5]), "seeds[1]"),
    ("integral float seed", lambda c: _with(c, "seeds", [1.0]), "seeds[0]"),
    ("string seed", lambda c: _with(c, "seeds", ["one"]), "seeds[0]"),
    ("kd.top_k above the vocabulary in an override",
     lambda c: _with(c, "experiments.1.overrides", {"kd": {"top_k": 100000}}), "experiments[1].overrides.kd.top_k"),
    ("kd.top_k above the vocabulary in a grid",
     lambda c: _with(c, "experiments.1.grid", {"kd.top_k": [8, 100000]}), "experiments[1].grid.kd.top_k"),
    ("real dataset without a path", lambda c: _with(c, "datasets.arith", {"source": "tulu3"}), "datasets.arith.path"),
    ("missing local dataset path", lambda c: _with(c, "datasets.arith", {"source": "tulu3", "path": "/no/such/dir"}),
     "datasets.arith.path"),
    ("missing local teacher path", lambda c: _with(c, "teacher", {"source": "pretrained",
                                                                  "name_or_path": "./no/such/model"}),
     "teacher.name_or_path"),
    ("scratch student without arch", lambda c: _with(c, "students.tiny", {"init": "scratch"}), "students.tiny.arch"),
    ("top_k larger than the vocabulary", lambda c: _with(c, "kd.top_k", 100000), "kd.top_k"),
    ("bad dataset name", lambda c: _with(c, "datasets", {"bad name": {"source": "embedded"}}), "datasets"),
    ("compiled layers under FSDP",
     lambda c: _with(c, "training", {**c.get("training", {}), "gpus": 2, "distributed": "fsdp",
                                     "torch_compile": "layers"}), "training.torch_compile"),
    ("folded clip under FSDP in a grid",
     lambda c: _with(_with(c, "training", {**c.get("training", {}), "gpus": 2, "distributed": "fsdp"}),
                     "experiments.1.grid", {"training.optim": ["auto", "adamw_fused_clip"]}),
     "experiments[1].grid.training.optim"),
    ("folded clip with fp16 in an override",
     lambda c: _with(c, "experiments.1.overrides", {"training": {"precision": "fp16", "optim": "adamw_fused_clip"}}),
     "experiments[1].overrides.training"),
    ("min_steps above max_steps", lambda c: _with(c, "datasets.arith.task.min_steps", 9),
     "datasets.arith.task.min_steps"),
]


@pytest.mark.parametrize("description,mutate,key", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_is_rejected_naming_the_key(embedded, description, mutate, key):
    with pytest.raises(ConfigError) as info:
        validate_config(mutate(embedded))
    assert f"'{key}" in str(info.value), str(info.value)


def test_typo_gets_a_did_you_mean_hint(embedded):
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        validate_config(_with(embedded, "training.lrr", 0.1))


def test_defaults_are_filled_without_touching_the_input(embedded):
    original = copy.deepcopy(embedded)
    cfg = validate_config(embedded)
    assert embedded == original
    assert cfg["eval"]["confidence"] == 0.95
    assert cfg["synthetic"]["filters"]["drop_truncated"] is True
    assert cfg["energy"]["policy"] == "measured"


def test_grid_expands_into_one_experiment_per_point_sharing_one_cache(embedded):
    plan = build_plan(validate_config(embedded))
    kd = [e for e in plan.experiments.values() if e.pipeline == "kd"]
    assert sorted({e.sections["kd"]["temperature"] for e in kd}) == [1.0, 2.0]
    assert len(kd) == 2 * len(embedded["seeds"])
    assert len({e.artifact for e in kd}) == 1, "a temperature sweep must reuse one logit cache"
    cache = plan.artifacts[kd[0].artifact]
    assert sorted(cache.consumers) == sorted(e.id for e in kd)


def test_changing_one_experiment_changes_only_its_parameters(embedded):
    cfg = _with(embedded, "experiments.0.overrides", {"training": {"lr": 1e-3}})
    before = build_plan(validate_config(embedded))
    after = build_plan(validate_config(cfg))
    changed = [e for e in before.experiments if before.experiments[e].sections != after.experiments[e].sections]
    assert changed == ["sft_gt.tiny.arith.s1", "sft_gt.tiny.arith.s2", "sft_gt.tiny.arith.s3"]


def test_every_student_experiment_runs_once_per_seed_and_lineage_pairs_by_seed(embedded):
    plan = build_plan(validate_config({**embedded, "seeds": [4, 7]}))
    assert all(e.id == f"{e.group}.s{e.seed}" for e in plan.experiments.values())
    assert sorted(plan.groups()["kd.tiny.arith.temperature-2"]) == ["kd.tiny.arith.temperature-2.s4",
                                                                     "kd.tiny.arith.temperature-2.s7"]
    for exp in plan.experiments.values():
        assert all(plan.experiments[u].seed == exp.seed for u in exp.lineage), exp.id
    assert plan.experiments["dpo.tiny.arith.s7"].init_from == "sft.tiny.arith.s7"
    assert plan.experiments["selfdistill.tiny.arith.s4"].init_from == "sft_gt.tiny.arith.s4"
    # teacher artifacts do not depend on the student seed: one logit cache, one synthetic set, all seeds consume
    teacher_logits = [a for a in plan.artifacts.values() if a.kind == "logits" and a.teacher == "teacher"]
    assert len(teacher_logits) == 1 and len(teacher_logits[0].consumers) == 4
    synthetic = [a for a in plan.artifacts.values() if a.kind == "synthetic"]
    assert len(synthetic) == 1 and len(synthetic[0].consumers) == 2
    # artifacts an earlier student produces are per seed
    selfdistill_caches = {plan.experiments[f"selfdistill.tiny.arith.s{s}"].artifact for s in (4, 7)}
    assert len(selfdistill_caches) == 2


def test_adding_a_seed_leaves_the_other_seeds_and_artifacts_unchanged(embedded):
    before = build_plan(validate_config({**embedded, "seeds": [1, 2]}))
    after = build_plan(validate_config({**embedded, "seeds": [1, 2, 3]}))
    assert set(after.experiments) - set(before.experiments) == {f"{g}.s3" for g in before.groups()}
    for exp_id, exp in before.experiments.items():
        again = after.experiments[exp_id]
        assert (again.sections, again.artifact, again.lineage) == (exp.sections, exp.artifact, exp.lineage)
    for art_id, art in before.artifacts.items():
        assert after.artifacts[art_id].params == art.params and after.artifacts[art_id].stage_ids == art.stage_ids


def test_lineage_naming_one_seed_is_refused(embedded):
    cfg = copy.deepcopy(embedded)
    cfg["seeds"] = [1, 2]
    next(e for e in cfg["experiments"] if e["pipeline"] == "dpo")["overrides"] = {
        "dpo": {"start_from": "sft.tiny.arith.s1"}}
    with pytest.raises(ConfigError, match="names one seed"):
        build_plan(validate_config(cfg))


def test_filter_change_reuses_generation_shards(embedded):
    cfg = _with(embedded, "synthetic.filters", {"dedup": False})
    a = build_plan(validate_config(embedded))
    b = build_plan(validate_config(cfg))
    art_a = next(x for x in a.artifacts.values() if x.kind == "synthetic")
    art_b = next(x for x in b.artifacts.values() if x.kind == "synthetic")
    assert art_a.shard_key == art_b.shard_key
    assert art_a.id != art_b.id


def test_duplicate_experiment_ids_are_refused(embedded):
    cfg = copy.deepcopy(embedded)
    cfg["experiments"].append(copy.deepcopy(cfg["experiments"][0]))
    with pytest.raises(ConfigError, match="produced twice"):
        build_plan(validate_config(cfg))


def test_cluster_example_is_valid_and_plans_the_full_grid():
    plan = build_plan(load_config(ROOT / "configs" / "olmo2_cluster.yaml"))
    assert len(plan.experiments) == 27
    assert {u[1] for u in plan.eval_units} >= {"gsm8k", "mmlu", "ifeval"}


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
