"""Roll-up accounting: amortisation sums back to the measured total, N* on hand-computed cases, honest errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distill_bench.config import build_plan, validate_config
from distill_bench.energy import EnergySettings, StageMeter, atomic_write_json
from distill_bench.report.rollup import RollupError, break_even_reuse, rollup_run

ROOT = Path(__file__).resolve().parents[1]

# hand-chosen gross energies (J) per stage kind
ENERGY_J = {"teacher.logits": 9000.0, "teacher.tail": 900.0, "teacher.generate": 3000.0, "teacher.merge": 100.0, "student.train": 1000.0,
            "eval": 200.0, "setup": 50.0, "data": 10.0}


def _energy_for(stage_id: str) -> float:
    for prefix, joules in ENERGY_J.items():
        if stage_id.startswith(prefix):
            return joules
    raise KeyError(stage_id)


def _write_stage(results: Path, stage_id: str, role: str, experiment: str | None, joules: float,
                 tokens: int = 1000) -> None:
    out = results / "energy" / f"{stage_id}.json"
    settings = EnergySettings(codecarbon=False, sample_interval_s=0.5)
    with StageMeter(stage="test", stage_id=stage_id, role=role, experiment=experiment, out_json=out,
                    settings=settings, install_signal_handlers=False) as meter:
        meter.add_tokens("trained_tokens", tokens)
        meter.set_primary_tokens("trained_tokens")
    record = json.loads(out.read_text())
    record["energy"].update(total_j=joules, net_j=joules * 0.9, total_kwh=joules / 3.6e6)
    atomic_write_json(out, record)


def _eval(results: Path, model_id: str, dataset: str, acc: float, n: int = 100) -> None:
    """An eval result with its per-item samples: the first round(acc * n) items correct."""
    path = results / "eval" / model_id / f"{dataset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metric = {"value": acc, "ci_low": acc - 0.05, "ci_high": acc + 0.05, "stderr": 0.02}
    correct = [i < round(acc * n) for i in range(n)]
    (path.parent / f"{dataset}.samples.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "strict_correct": c, "flexible_correct": c}) + "\n" for i, c in enumerate(correct)))
    path.write_text(json.dumps({"model_id": model_id, "dataset": dataset, "backend": "native", "n": n,
                                "metrics": {"strict_match": metric, "flexible_extract": metric},
                                "samples": f"{dataset}.samples.jsonl"}))


def _build_run(tmp_path: Path, extra_experiments: list[dict] | None = None) -> tuple[Path, dict]:
    with open(ROOT / "workflow_config.yaml") as fh:
        raw = yaml.safe_load(fh)
    raw["experiments"] = [e for e in raw["experiments"] if e["pipeline"] in ("sft_gt", "kd", "sft")]
    raw["experiments"] += extra_experiments or []
    cfg = validate_config({**raw, "results_dir": str(tmp_path)})
    plan = build_plan(cfg)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "plan.json").write_text(json.dumps(plan.to_dict()))
    (tmp_path / "config" / "merged_config.yaml").write_text(yaml.safe_dump(cfg))
    accuracy = {"sft_gt": 0.50, "kd": 0.60, "sft": 0.40}
    for stage_id in plan.all_stage_ids():
        role = stage_id.split(".")[0]
        role = {"data": "data", "setup": "setup", "teacher": "teacher", "student": "student", "eval": "eval"}[role]
        _write_stage(tmp_path, stage_id, role, None, _energy_for(stage_id))
    for model_id, dataset in plan.eval_units:
        pipeline = plan.experiments[model_id].pipeline if model_id in plan.experiments else None
        _eval(tmp_path, model_id, dataset, accuracy.get(pipeline, 0.9 if model_id == "teacher" else 0.01))
    return tmp_path, plan.to_dict()


ENERGY_J["student.train.sft.tiny"] = 1000.0


@pytest.fixture()
def run_dir(tmp_path) -> tuple[Path, dict]:
    """A run whose two KD students share one logit cache, with hand-chosen energies and accuracies."""
    return _build_run(tmp_path)


def test_amortised_column_sums_back_with_upstream_checkpoints(tmp_path):
    """Self-distillation and continued training both build on the sft_gt checkpoint: its training is shared."""
    results, plan = _build_run(tmp_path, [
        {"pipeline": "selfdistill", "students": ["tiny"], "datasets": ["arith"],
         "overrides": {"selfdistill": {"from": "sft_gt", "method": "kd"}}},
        {"pipeline": "continued", "students": ["tiny"], "datasets": ["arith"],
         "overrides": {"selfdistill": {"from": "sft_gt"}}},
    ])
    rollup_run(results, plots=False)
    table = pd.read_csv(results / "summary" / "comparison_by_seed.csv").set_index("experiment")
    consumed = set()
    from distill_bench.report.rollup import charged_units

    for exp_id in plan["experiments"]:
        for ids in charged_units(plan, exp_id).values():
            consumed |= set(ids)
    measured = sum(_energy_for(s) for s in consumed) / 3.6e6
    assert table.total_kwh_amortised.sum() == pytest.approx(measured, rel=1e-12)
    assert table.loc["continued.tiny.arith.s1", "upstream_kwh_oneoff"] == pytest.approx(1000 / 3.6e6)
    assert table.loc["continued.tiny.arith.s2", "lineage"] == "sft_gt.tiny.arith.s2 -> continued.tiny.arith.s2"
    # seed 2's sft_gt training is shared three ways: its own run, seed 2 of self-distillation and of continued
    assert table.loc["continued.tiny.arith.s2", "upstream_kwh_amortised"] == pytest.approx(1000 / 3 / 3.6e6)
    assert table.loc["selfdistill.tiny.arith.s3", "teacher_kwh_oneoff"] == pytest.approx(9000 / 3.6e6)
    groups = pd.read_csv(results / "summary" / "comparison.csv").set_index("experiment")
    assert groups.loc["continued.tiny.arith", "lineage"] == "sft_gt.tiny.arith -> continued.tiny.arith"
    assert groups.loc["continued.tiny.arith", "seeds"] == "1,2,3"


def test_amortised_teacher_cost_sums_back_to_the_measured_total(run_dir):
    results, plan = run_dir
    rollup_run(results, plots=False)
    table = pd.read_csv(results / "summary" / "comparison_by_seed.csv").set_index("experiment")
    teacher_stages = {s for art in plan["artifacts"].values() for s in art["stage_ids"]}
    assert table.teacher_kwh_amortised.sum() == pytest.approx(sum(map(_energy_for, teacher_stages)) / 3.6e6,
                                                              rel=1e-12)
    for art_id, art in plan["artifacts"].items():
        measured_kwh = sum(_energy_for(s) for s in art["stage_ids"]) / 3.6e6
        if art["kind"] == "logit_tail":   # charged on top of its cache, to the students at its temperature only
            assert art["consumers"] == [f"kd.tiny.arith.temperature-2.s{seed}" for seed in (1, 2, 3)]
            continue
        rows = table[table.artifact == art_id]
        assert len(rows) == len(art["consumers"])
        tails = [sum(_energy_for(s) for t in plan["artifacts"].values() if e in t["consumers"]
                     and t["kind"] == "logit_tail" for s in t["stage_ids"]) / 3.6e6 for e in rows.index]
        assert (rows.teacher_kwh_oneoff - tails).tolist() == pytest.approx([measured_kwh] * len(rows), rel=1e-12)


def test_kd_students_sharing_one_cache_are_each_charged_half_amortised(run_dir):
    """Both share the cache (9000 J); only the tau = 2 student uses (and pays for) the tau = 2 tail (900 J)."""
    results, _ = run_dir
    table = rollup_run(results, plots=False).set_index("experiment")
    kd = table[table.pipeline == "kd"].sort_index()
    assert len(kd) == 2
    # one cache, two temperatures x three seeds: six consumers; tau = 2's tail (900 J): its three seeds
    assert kd.teacher_kwh_amortised.tolist() == pytest.approx([1500 / 3.6e6, (1500 + 300) / 3.6e6])
    assert kd.total_kwh_oneoff.tolist() == pytest.approx([(9000 + 1000 + 200) / 3.6e6,
                                                          (9000 + 900 + 1000 + 200) / 3.6e6])


def test_break_even_reuse_from_the_rolled_up_run(run_dir):
    results, _ = run_dir
    table = rollup_run(results, plots=False).set_index("experiment")
    # kd: teacher 9000 J, own 1200 J, baseline 1200 J -> no per-student margin -> never (quality is better)
    assert table.loc["kd.tiny.arith.temperature-1", "verdict"] == "better"
    assert table.loc["kd.tiny.arith.temperature-1", "break_even_reuse"] == math.inf
    assert table.loc["kd.tiny.arith.temperature-1", "break_even_status"] == "never"
    assert table.loc["sft.tiny.arith", "verdict"] == "worse"
    assert table.loc["sft_gt.tiny.arith", "verdict"] == "baseline"


@pytest.mark.parametrize("teacher,student,baseline,verdict,expected,status", [
    (1000.0, 100.0, 200.0, "better", 10.0, "ok"),            # 1000/N + 100 <= 200  ->  N >= 10
    (1000.0, 100.0, 300.0, "better", 5.0, "ok"),             # margin 200 -> exactly 5
    (1001.0, 100.0, 300.0, "better", 6.0, "ok"),             # just over 5 -> 6
    (0.0, 100.0, 200.0, "better", 0.0, "ok"),                # T = 0, B > S: ceil(0 / 100) = 0, the README formula
    (0.0, 200.0, 200.0, "better", math.inf, "never"),        # T = 0, B = S: B > S fails -> never
    (1000.0, 250.0, 200.0, "better", math.inf, "never"),     # more expensive per student -> never
    (1000.0, 100.0, 200.0, "worse", math.nan, "worse"),
    (1000.0, 100.0, 200.0, "no detectable difference", math.nan, "not significant"),
    # quality is the first gate: a row not shown better names that, whatever the sign of the energy margin
    (1000.0, 250.0, 200.0, "no detectable difference", math.nan, "not significant"),
    (1000.0, 250.0, 200.0, "worse", math.nan, "worse"),
    (1000.0, 100.0, 200.0, None, math.nan, "missing eval"),  # an eval result is missing: no verdict
    (1000.0, 100.0, math.nan, "better", math.nan, "no baseline"),
])
def test_break_even_reuse_hand_computed(teacher, student, baseline, verdict, expected, status):
    value, why = break_even_reuse(teacher, student, baseline, verdict)
    assert why == status
    assert (math.isnan(value) and math.isnan(expected)) or value == expected


def test_stages_csv_always_has_its_header(run_dir):
    results, _ = run_dir
    rollup_run(results, plots=False)
    frame = pd.read_csv(results / "summary" / "stages.csv")
    assert list(frame.columns)[:3] == ["stage_id", "stage", "role"]
    from distill_bench.report.rollup import stages_frame

    empty = stages_frame({})
    assert empty.to_csv(index=False).splitlines()[0].startswith("stage_id,stage,role")


def test_missing_stage_json_is_named_not_read_as_zero(run_dir):
    results, _ = run_dir
    victim = next((results / "energy").glob("teacher.logits.*.json"))
    victim.unlink()
    with pytest.raises(RollupError, match=victim.stem):
        rollup_run(results, plots=False)


def test_newer_schema_version_is_refused_with_the_file_named(run_dir):
    results, _ = run_dir
    victim = results / "energy" / "setup.teacher.json"
    record = json.loads(victim.read_text())
    record["schema_version"] = 99
    victim.write_text(json.dumps(record))
    with pytest.raises(RollupError, match="setup.teacher.json"):
        rollup_run(results, plots=False)


def test_hand_edited_invalid_stage_json_is_refused(run_dir):
    results, _ = run_dir
    victim = results / "energy" / "setup.tokenizer.json"
    record = json.loads(victim.read_text())
    record["role"] = "wizard"
    victim.write_text(json.dumps(record))
    with pytest.raises(RollupError, match="setup.tokenizer.json"):
        rollup_run(results, plots=False)


def test_plots_and_markdown_are_written(run_dir):
    results, _ = run_dir
    rollup_run(results, plots=True)
    for name in ("pareto.png", "energy_by_role.png", "run_timeline.png", "reconciliation.md", "reconciliation.json", "comparison.md"):
        assert (results / "summary" / name).stat().st_size > 0
    md = (results / "summary" / "comparison.md").read_text()
    assert "never" in md and "kd.tiny.arith.temperature-2" in md


def test_compare_joins_two_runs(run_dir, tmp_path_factory):
    from distill_bench.report.compare import compare_runs

    results, _ = run_dir
    rollup_run(results, plots=False)
    out = tmp_path_factory.mktemp("cmp")
    table = compare_runs([str(results), str(results)], out, labels=["a", "b"])
    assert set(table.run) == {"a", "b"}
    assert (out / "comparison_of_runs.png").stat().st_size > 0
    assert (out / "comparison_of_runs.csv").exists()


def test_rollup_writes_forecast_vs_measured_for_every_stage(run_dir):
    results, plan = run_dir
    rollup_run(results, plots=False)
    text = (results / "summary" / "forecast_vs_measured.md").read_text()
    assert text.startswith("# Forecast vs measured (cpu")   # no GPU in these stage JSONs
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")][1:-1]
    assert rows == plan["stage_ids"]
    # the hand-chosen energies come back as measured kWh: student.train rows measured 1000 J
    sft = next(line for line in text.splitlines() if line.startswith("| student.train.sft_gt.tiny.arith.s1 |"))
    assert f"| {1000 / 3.6e6:.3g} |" in sft


def _set_energy(results: Path, stage_id: str, joules: float) -> None:
    path = results / "energy" / f"{stage_id}.json"
    record = json.loads(path.read_text())
    record["energy"].update(total_j=joules, net_j=joules * 0.9, total_kwh=joules / 3.6e6)
    atomic_write_json(path, record)


def test_n_star_and_verdict_on_hand_built_cases(run_dir):
    """Significant and cheaper per student -> N* a number; a difference inside the noise -> 'not significant'."""
    results, plan = run_dir
    for exp_id, exp in plan["experiments"].items():
        if exp["pipeline"] == "kd":
            _set_energy(results, f"student.train.{exp_id}", 500.0)      # own 700 J vs the baseline's 1200 J
            if exp["variant"] == {"kd.temperature": 2.0}:
                _eval(results, exp_id, "arith", 0.51)                  # one item better than sft_gt's 0.50
    table = rollup_run(results, plots=False).set_index("experiment")
    better = table.loc["kd.tiny.arith.temperature-1"]
    assert better.verdict == "better" and better.delta_vs_baseline == pytest.approx(0.10)
    assert better.p_value < 0.05 and better.delta_ci_low > 0
    assert better.break_even_reuse == 18 and better.break_even_status == "ok"     # ceil(9000 / (1200 - 700))
    same = table.loc["kd.tiny.arith.temperature-2"]
    assert same.verdict == "no detectable difference" and same.p_value >= 0.05
    assert math.isnan(same.break_even_reuse) and same.break_even_status == "not significant"
    md = (results / "summary" / "comparison.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| kd.tiny.arith.temperature-2 "))
    assert row.rstrip().endswith("| not significant |")


def test_missing_baseline_eval_prints_no_n_star(run_dir):
    """The baseline's per-item results are gone: no verdict, and N* says why instead of printing a number."""
    results, plan = run_dir
    for exp_id, exp in plan["experiments"].items():
        if exp["pipeline"] == "kd":
            _set_energy(results, f"student.train.{exp_id}", 500.0)
        if exp["pipeline"] == "sft_gt":
            (results / "eval" / exp_id / "arith.samples.jsonl").unlink()
    table = rollup_run(results, plots=False).set_index("experiment")
    row = table.loc["kd.tiny.arith.temperature-1"]
    assert row.verdict == "missing eval" and row.break_even_status == "missing eval"
    assert math.isnan(row.break_even_reuse)


def test_a_failed_seed_is_named_and_the_statistics_use_the_others(run_dir):
    results, plan = run_dir
    victim = "kd.tiny.arith.temperature-1.s2"
    (results / "energy" / f"student.train.{victim}.json").unlink()
    (results / "eval" / victim / "arith.json").unlink()
    (results / "energy" / f"eval.{victim}.arith.json").unlink()
    table = rollup_run(results, plots=False).set_index("experiment")
    row = table.loc["kd.tiny.arith.temperature-1"]
    assert row.seeds == "1,2,3" and row.n_seeds == 2 and row.missing_seeds == "s2: training,eval"
    assert row.paired_seeds == "1,3" and json.loads(row.flexible_acc_per_seed) == {"1": 0.6, "3": 0.6}
    md = (results / "summary" / "comparison.md").read_text()
    assert "1,2,3 (missing s2: training,eval)" in md and "Missing seeds" in md
    by_seed = pd.read_csv(results / "summary" / "comparison_by_seed.csv").set_index("experiment")
    assert by_seed.loc[victim, "missing"] == "training,eval"


def test_every_seed_of_an_experiment_missing_is_an_error(run_dir):
    results, plan = run_dir
    for seed in (1, 2, 3):
        (results / "energy" / f"student.train.sft.tiny.arith.s{seed}.json").unlink()
    with pytest.raises(RollupError, match="no seed of experiment.*sft.tiny.arith"):
        rollup_run(results, plots=False)


def test_trained_tokens_are_the_final_total_not_the_sum_of_attempts(run_dir):
    """A resumed run: attempts processed 30,000 + 24,169 tokens (some redone after the resume); the model trained
    on the 30,000-token budget. The table shows 30,000, and tok/s is processed tokens over the summed duration."""
    results, plan = run_dir
    stage_id = "student.train.sft_gt.tiny.arith.s1"
    path = results / "energy" / f"{stage_id}.json"
    record = json.loads(path.read_text())
    record["tokens"]["counts"]["trained_tokens"] = 54169
    record["metrics"] = {**(record.get("metrics") or {}), "trained_tokens_total": 30000}
    record["duration_s"] = 100.0
    atomic_write_json(path, record)
    rollup_run(results, plots=False)
    by_seed = pd.read_csv(results / "summary" / "comparison_by_seed.csv").set_index("experiment")
    assert by_seed.loc["sft_gt.tiny.arith.s1", "trained_tokens"] == 30000
    assert by_seed.loc["sft_gt.tiny.arith.s1", "processed_tokens"] == 54169
    assert by_seed.loc["sft_gt.tiny.arith.s1", "train_tokens_per_s"] == pytest.approx(541.69)


def test_roll_up_refuses_amortised_shares_that_do_not_sum_back(run_dir, monkeypatch):
    """The invariant is enforced: a divisor that drops a consumer would make the shares overshoot the total."""
    from distill_bench.report import rollup

    results, _ = run_dir
    real = rollup.unit_consumers
    monkeypatch.setattr(rollup, "unit_consumers", lambda plan: {k: max(1, v - 1) for k, v in real(plan).items()})
    with pytest.raises(RollupError, match="amortised totals sum to"):
        rollup_run(results, plots=False)


@pytest.mark.parametrize("content, reason", [
    ("{not json", "unreadable"),
    ("{}", "no metrics"),
    ('{"metrics": {"strict_match": {"value": 0.5}}, "status": "running"}', "status 'running'"),
])
def test_broken_eval_result_fails_the_rollup_naming_file_and_reason(run_dir, content, reason):
    results, _ = run_dir
    victim = results / "eval" / "kd.tiny.arith.temperature-1.s1" / "arith.json"
    victim.write_text(content)
    with pytest.raises(RollupError, match=f"{victim}.*{reason}"):
        rollup_run(results, plots=False)


def test_missing_eval_result_fails_the_rollup_naming_it(run_dir):
    results, _ = run_dir
    victim = results / "eval" / "teacher" / "arith.json"
    victim.unlink()
    with pytest.raises(RollupError, match=f"{victim}.*missing"):
        rollup_run(results, plots=False)


@pytest.mark.parametrize("status", ["running", "failed", "interrupted"])
def test_non_final_stage_json_fails_the_rollup_naming_file_and_status(run_dir, status):
    results, _ = run_dir
    victim = results / "energy" / "student.train.sft_gt.tiny.arith.s1.json"
    record = json.loads(victim.read_text())
    record["status"] = status
    victim.write_text(json.dumps(record))
    with pytest.raises(RollupError, match=f"{victim}.*status '{status}'"):
        rollup_run(results, plots=False)


@pytest.mark.parametrize("content", ["{}", "", "{trunc"])
def test_empty_or_unreadable_stage_json_fails_the_rollup_naming_it(run_dir, content):
    results, _ = run_dir
    victim = results / "energy" / "setup.tokenizer.json"
    victim.write_text(content)
    with pytest.raises(RollupError, match=str(victim)):
        rollup_run(results, plots=False)


def test_rollup_command_names_the_broken_eval_file(run_dir, capsys):
    from distill_bench.cli import main

    results, _ = run_dir
    victim = results / "eval" / "sft.tiny.arith.s1" / "arith.json"
    victim.write_text("{oops")
    with pytest.raises(SystemExit) as exc:
        main(["rollup", str(results)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "unreadable" in err and "Traceback" not in err
