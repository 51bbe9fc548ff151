"""The rebuild contract (README, "What a change reruns"): after a complete run, each kind of config change plans
exactly the jobs of its row, no more and no fewer. One dry-run per row, against a completed run of
tests/configs/tiny.yaml.

The completed run is faked once per session: every output of the DAG is created (empty), then
`snakemake --touch --forceall` stamps them in DAG order and records each job's params and code in
.snakemake/metadata, exactly what a real run leaves for Snakemake's rerun triggers (mtime, params, input, code).
A real run takes minutes; this takes seconds and plans the same reruns (tests/test_workflow.py checks the real
run's replans for the per-experiment rows).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from test_workflow import TINY, planned_jobs, snakemake

# local bookkeeping every config change reruns (cheap: config snapshot, roll-up, W&B log, the target)
ALWAYS = {"all", "config_snapshot", "rollup", "wandb_log"}


def _plan(mutate=None):
    from distill_bench.config.preflight import preflight

    cfg = yaml.safe_load(TINY.read_text())
    if mutate is not None:
        mutate(cfg)
    return preflight(cfg)[1]


BASE = _plan()
STUDENTS = sorted(BASE.experiments)                     # experiment ids as the plan spells them


def _ids(*pipelines: str) -> list[str]:
    return sorted(e.id for e in BASE.experiments.values() if e.pipeline in pipelines)


def _new_ids(mutate) -> list[str]:
    return sorted(set(_plan(mutate).experiments) - set(BASE.experiments))


KD = _ids("kd")
CACHE = r"arith-k8-float16-\w+"
SELF_CACHE = r"arith-from-sft_gt-[\w-]+"
SYNTH = r"arith-t0-p1-n24-s1-\w+"
PAIRS = r"arith-teacher_logprob-n3-[\w-]+"


def _exact(ids):
    return [re.escape(i) for i in ids]


def _evals(models):
    return [f"{re.escape(m)},arith" for m in models]


SFT_CHAIN = {   # a new synthetic set: the sft student and the DPO run that starts from it (new preference pairs)
    "merge_synthetic": [SYNTH], "train_student": _exact(_ids("sft", "dpo")), "evaluate": _evals(_ids("sft", "dpo")),
    "sample_preferences": [PAIRS], "judge_preferences": [PAIRS],
}


def fake_complete_run(workdir: Path, config: Path) -> Path:
    """A results tree in which every job of ``config`` looks finished, with Snakemake's metadata recorded."""
    summary = snakemake("-n", "--detailed-summary", "--configfile", str(config), cwd=workdir).stdout
    for line in summary.splitlines():
        path = line.split("\t")[0]
        if not path.startswith("results/"):
            continue
        target = workdir / path
        if Path(path).suffix:                     # every declared file output has a suffix; directories do not
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}")
        else:
            target.mkdir(parents=True, exist_ok=True)
    snakemake("--touch", "--forceall", "-c1", "--configfile", str(config), cwd=workdir)
    assert "Nothing to be done" in snakemake("-n", "--configfile", str(config), cwd=workdir).stdout
    return workdir


@pytest.fixture(scope="session")
def completed(tmp_path_factory) -> Path:
    return fake_complete_run(tmp_path_factory.mktemp("completed_tiny"), TINY)


def replan(completed: Path, tmp_path: Path, mutate) -> dict[str, list[str]]:
    """Rule -> sorted wildcard values ("a,b") of every job a dry-run plans after ``mutate(config)``."""
    cfg = yaml.safe_load(TINY.read_text())
    mutate(cfg)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    out: dict[str, list[str]] = {}
    for rule, wildcards in planned_jobs(snakemake("-n", "--configfile", str(changed), cwd=completed).stdout):
        out.setdefault(rule, []).append(",".join(wildcards.values()))
    return {rule: sorted(values) for rule, values in out.items()}


def assert_plan(plan: dict[str, list[str]], expected: dict[str, list[str]]) -> None:
    """The plan holds exactly ``expected`` (values are regexes, one per job) plus the ALWAYS bookkeeping."""
    assert set(plan) - ALWAYS == set(expected), f"rules planned: {plan}"
    for rule, patterns in expected.items():
        got = list(plan[rule])
        assert len(got) == len(patterns), f"{rule}: planned {got}, expected {patterns}"
        for pattern in patterns:
            match = next((g for g in got if re.fullmatch(pattern, g)), None)
            assert match is not None, f"{rule}: nothing planned matches {pattern!r} in {got}"
            got.remove(match)


def _exp(cfg: dict, pipeline: str) -> dict:
    return next(e for e in cfg["experiments"] if e["pipeline"] == pipeline)


# ------------------------------------------------------------------------------------------ one test per row
def test_row_training_hyperparameter_retrains_every_student_and_what_is_built_from_them(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: c["training"].update(lr=1e-3))
    assert_plan(plan, {"train_student": _exact(STUDENTS), "evaluate": _evals(STUDENTS),
                       "cache_logits": [SELF_CACHE], "sample_preferences": [PAIRS], "judge_preferences": [PAIRS]})


def test_row_training_setting_the_teacher_uses_also_rebuilds_the_teacher_side(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: c["training"].update(max_length=90))
    assert_plan(plan, {"train_student": _exact(STUDENTS), "evaluate": _evals(STUDENTS + ["teacher"]),
                       "prepare_teacher": [""], "cache_logits": [CACHE, SELF_CACHE], "cache_tail": [CACHE + "-tau2"],
                       "generate_synthetic": [SYNTH + ",0,2", SYNTH + ",1,2"], "merge_synthetic": [SYNTH],
                       "sample_preferences": [PAIRS], "judge_preferences": [PAIRS]})


def test_row_kd_temperature_added_computes_only_its_tail_and_its_student(completed, tmp_path):
    def mutate(c):
        _exp(c, "kd").update(grid={"kd.temperature": [1.0, 2.0, 4.0]})

    plan = replan(completed, tmp_path, mutate)
    new = _new_ids(mutate)
    assert new and all("temperature-4" in e for e in new)
    assert_plan(plan, {"cache_tail": [CACHE + "-tau4"], "train_student": _exact(new), "evaluate": _evals(new)})


def test_row_kd_temperature_removed_reruns_no_stage(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: _exp(c, "kd").update(grid={"kd.temperature": [1.0]}))
    assert_plan(plan, {})


def test_row_kd_temperature_swapped_keeps_the_cache_and_the_unchanged_student(completed, tmp_path):
    """The issue's case: {1, 2} -> {1, 4} once rebuilt the cache and retrained the tau = 1 student."""
    def mutate(c):
        _exp(c, "kd").update(grid={"kd.temperature": [1.0, 4.0]})

    plan = replan(completed, tmp_path, mutate)
    new = _new_ids(mutate)
    assert_plan(plan, {"cache_tail": [CACHE + "-tau4"], "train_student": _exact(new), "evaluate": _evals(new)})


def test_row_kd_alpha_retrains_the_kd_students_only(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: _exp(c, "kd").update(overrides={"kd": {"alpha": 0.3}}))
    assert_plan(plan, {"train_student": _exact(KD), "evaluate": _evals(KD)})


def test_row_synthetic_filter_reuses_the_generated_shards(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: c["synthetic"]["filters"].update(min_tokens=2))
    assert_plan(plan, SFT_CHAIN)


def test_row_generation_setting_regenerates_the_shards_and_the_synthetic_chain(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: c["synthetic"].update(max_new_tokens=20))
    sft_chain = {**SFT_CHAIN, "merge_synthetic": [SYNTH.replace("n24", "n20")]}
    gen = SYNTH.replace("n24", "n20")
    assert_plan(plan, {**sft_chain, "generate_synthetic": [gen + ",0,2", gen + ",1,2"]})


def test_row_eval_setting_reruns_every_evaluation_and_nothing_else(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: c["eval"].update(max_new_tokens=20))
    assert_plan(plan, {"evaluate": _evals(STUDENTS + ["teacher", "init.tiny"])})


def test_row_new_student_builds_only_its_own_jobs(completed, tmp_path):
    def mutate(cfg):
        cfg["students"]["small"] = {"init": "scratch", "arch": {"hidden_size": 24, "num_layers": 1, "num_heads": 2,
                                                                 "intermediate_size": 48}}
        _exp(cfg, "sft_gt")["students"].append("small")

    plan = replan(completed, tmp_path, mutate)
    new = _new_ids(mutate)
    assert new and all(e.startswith("sft_gt.small.arith") for e in new)
    assert_plan(plan, {"init_student": ["small"], "train_student": _exact(new),
                       "evaluate": _evals(["init.small"] + new)})


def test_row_new_dataset_retrains_the_trained_tokenizer_and_so_everything(completed, tmp_path):
    """The embedded tokenizer is trained on every configured dataset, so a new dataset changes it, and every model
    built on it; the existing dataset is not prepared again."""
    def mutate(cfg):
        cfg["datasets"]["arith2"] = {**cfg["datasets"]["arith"], "n_train": 200}
        _exp(cfg, "sft_gt")["datasets"].append("arith2")

    plan = replan(completed, tmp_path, mutate)
    assert plan["prepare_data"] == ["arith2"], "the existing dataset is not rebuilt"
    assert plan["prepare_tokenizer"] == [""] and plan["prepare_teacher"] == [""]
    new = _new_ids(mutate)
    assert sorted(plan["train_student"]) == sorted(STUDENTS + new)
    assert {"teacher,arith2", "init.tiny,arith2", *(f"{e},arith2" for e in new)} <= set(plan["evaluate"])


def test_row_new_seed_trains_only_the_new_seeds_students(completed, tmp_path):
    from distill_bench.config.load import _schema

    default_seeds = _schema()["properties"]["seeds"]["default"]
    new_seed = max(default_seeds) + 1

    def add_seed(cfg):
        cfg["seeds"] = [*(cfg.get("seeds") or default_seeds), new_seed]

    plan = replan(completed, tmp_path, add_seed)
    assert plan["train_student"] and all(s.endswith(f".s{new_seed}") for s in plan["train_student"])
    assert all(f".s{new_seed}," in s for s in plan["evaluate"] if not s.startswith(("teacher,", "init.")))
    # the teacher's artifacts are shared by every seed; only artifacts built from the new seed's own students
    # (the self-distillation cache of its sft_gt student, preference pairs sampled from its sft student) are new
    assert not set(plan) & {"prepare_data", "prepare_tokenizer", "prepare_teacher", "generate_synthetic",
                            "merge_synthetic", "cache_tail"}
    built_from_students = plan.get("cache_logits", []) + plan.get("sample_preferences", [])
    assert built_from_students and all(f"-s{new_seed}-" in a for a in built_from_students)


def test_row_energy_settings_rerun_only_the_hardware_check_and_idle_baseline(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: c["energy"].update(sample_interval_s=0.5, policy="gpu_only"))
    assert_plan(plan, {"prerun": [""], "idle_baseline": [""]})


def test_row_changed_teacher_rebuilds_its_artifacts_and_their_students_only(completed, tmp_path):
    plan = replan(completed, tmp_path, lambda c: c["teacher"]["train"].update(tokens=5000))
    distilled = _ids("dpo", "kd", "sft")
    assert_plan(plan, {"prepare_teacher": [""], "cache_logits": [CACHE], "cache_tail": [CACHE + "-tau2"],
                       "generate_synthetic": [SYNTH + ",0,2", SYNTH + ",1,2"], "merge_synthetic": [SYNTH],
                       "sample_preferences": [PAIRS], "judge_preferences": [PAIRS],
                       "train_student": [re.escape(s) for s in distilled],
                       "evaluate": _evals(distilled + ["teacher"])})


# ------------------------------------------------------------------------------------------ missing outputs
@pytest.mark.parametrize("stage_id, rule", [
    (f"student.train.{_ids('sft_gt')[0]}", "train_student"),
    ("eval.teacher.arith", "evaluate"),
    ("setup.tokenizer", "prepare_tokenizer"),
])
def test_deleted_stage_json_reruns_its_stage(completed, tmp_path, stage_id, rule):
    run = tmp_path / "run"
    shutil.copytree(completed, run, symlinks=True)
    (run / "results" / "energy" / f"{stage_id}.json").unlink()
    jobs = planned_jobs(snakemake("-n", "--configfile", str(TINY), cwd=run).stdout)
    assert rule in {r for r, _ in jobs}, jobs
    assert "rollup" in {r for r, _ in jobs}


def test_deleted_eval_result_reruns_its_evaluation(completed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(completed, run, symlinks=True)
    sft = _ids("sft")[0]
    (run / "results" / "eval" / sft / "arith.json").unlink()
    jobs = planned_jobs(snakemake("-n", "--configfile", str(TINY), cwd=run).stdout)
    assert ("evaluate", {"model_id": sft, "eval_name": "arith"}) in jobs
