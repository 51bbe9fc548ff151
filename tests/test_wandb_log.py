"""W&B logging of a finished run, checked by decoding the offline runs it writes (no network, no account)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("wandb")

from distill_bench.config import build_plan, validate_config  # noqa: E402
from distill_bench.energy import EnergySettings, StageMeter, atomic_write_json  # noqa: E402
from distill_bench.report import wandb_log  # noqa: E402
from distill_bench.report.rollup import rollup_run  # noqa: E402
from distill_bench.report.wandb_log import (  # noqa: E402
    WandbNotInstalledError, log_from_config, log_run_to_wandb, read_offline_run, wandb_main)

ROOT = Path(__file__).resolve().parents[1]
ENERGY_J = {"teacher.logits": 9000.0, "teacher.tail": 900.0, "teacher.generate": 3000.0, "teacher.merge": 100.0, "student.train": 1000.0,
            "eval": 200.0, "setup": 50.0, "data": 10.0}
ACCURACY = {"sft_gt": 0.50, "kd": 0.60, "sft": 0.40}


def _energy_for(stage_id: str) -> float:
    return next(j for prefix, j in ENERGY_J.items() if stage_id.startswith(prefix))


def _loss_curve(exp_id: str) -> list[list[float]]:
    """A distinct curve per experiment, so a mix-up between runs shows."""
    offset = len(exp_id) / 100
    return [[step, round(3.0 / step + offset, 6)] for step in (1, 2, 3, 4, 5)]


def _build_finished_run(results: Path) -> dict:
    """Plan, stage JSONs (real StageMeter, CodeCarbon off), evals, train logs, then the real roll-up."""
    raw = yaml.safe_load((ROOT / "workflow_config.yaml").read_text())
    raw["experiments"] = [e for e in raw["experiments"] if e["pipeline"] in ("sft_gt", "kd", "sft")]
    cfg = validate_config({**raw, "results_dir": str(results)})
    plan = build_plan(cfg)
    (results / "config").mkdir(parents=True)
    (results / "config" / "plan.json").write_text(json.dumps(plan.to_dict()))
    (results / "config" / "merged_config.yaml").write_text(yaml.safe_dump(cfg))
    settings = EnergySettings(codecarbon=False, sample_interval_s=0.5)
    for stage_id in plan.all_stage_ids():
        out = results / "energy" / f"{stage_id}.json"
        with StageMeter(stage="test", stage_id=stage_id, role=stage_id.split(".")[0], experiment=None,
                        out_json=out, settings=settings, install_signal_handlers=False) as meter:
            meter.add_tokens("trained_tokens", 1000)
            meter.set_primary_tokens("trained_tokens")
        record = json.loads(out.read_text())
        joules = _energy_for(stage_id)
        record["energy"].update(total_j=joules, net_j=joules * 0.9, total_kwh=joules / 3.6e6)
        atomic_write_json(out, record)
    for model_id, dataset in plan.eval_units:
        exp = plan.experiments.get(model_id)
        acc = ACCURACY.get(exp.pipeline if exp else None, 0.9)
        metric = {"value": acc, "ci_low": acc - 0.05, "ci_high": acc + 0.05, "stderr": 0.02}
        path = results / "eval" / model_id / f"{dataset}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f"{dataset}.samples.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "strict_correct": i < acc * 100, "flexible_correct": i < acc * 100}) + "\n"
            for i in range(100)))
        path.write_text(json.dumps({"model_id": model_id, "dataset": dataset, "backend": "native", "n": 100,
                                    "metrics": {"strict_match": metric, "flexible_extract": metric},
                                    "samples": f"{dataset}.samples.jsonl"}))
    for exp_id in plan.experiments:
        log = {"trained_tokens": 1000, "steps": 5, "loss_curve": _loss_curve(exp_id),
               "lr_curve": [[s, 0.003 * (6 - s) / 5] for s in (1, 2, 3, 4, 5)], "final_loss": _loss_curve(exp_id)[-1][1]}
        if exp_id.startswith("sft."):  # a DPO-style extra curve is logged under its own name
            log["reward_accuracy_curve"] = [[2, 0.5], [4, 0.75]]
        path = results / "models" / "students" / exp_id / "train_log.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(log))
    rollup_run(results, plots=False)
    return plan.to_dict()


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline W&B with every local path in tmp, and a trap server standing in for the W&B backend."""
    home = tmp_path_factory.mktemp("wandb_home")
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(0.2)
    hits: list[tuple] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, addr = trap.accept()
            except (socket.timeout, OSError):
                continue
            hits.append(addr)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home),
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data"), "WANDB_API_KEY": "x" * 40,
           "WANDB_BASE_URL": f"http://127.0.0.1:{trap.getsockname()[1]}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield hits
    stop.set()
    thread.join()
    trap.close()


@pytest.fixture(scope="module")
def logged(tmp_path_factory, wandb_env):
    results = tmp_path_factory.mktemp("results")
    plan = _build_finished_run(results)
    wandb_dir = tmp_path_factory.mktemp("wandb_out")
    dirs = log_run_to_wandb(results, mode="offline", dir=wandb_dir)
    runs = {r["name"]: r for r in (read_offline_run(d) for d in dirs)}
    return results, plan, dirs, runs, wandb_dir


def test_one_offline_run_per_experiment_plus_the_stages_run(logged):
    _, plan, dirs, runs, wandb_dir = logged
    assert sorted(runs) == sorted(list(plan["experiments"]) + ["stages"])
    assert len(dirs) == len(runs)
    assert all(Path(d).parent == wandb_dir / "wandb" and Path(d).name.startswith("offline-run-") for d in dirs)
    assert {r["project"] for r in runs.values()} == {"distillation-energy-benchmark"}
    assert {r["group"] for r in runs.values()} == {plan["run_name"]}
    assert runs["stages"]["job_type"] == "energy"


def test_each_experiment_run_holds_its_own_loss_and_lr_curve(logged):
    _, plan, _, runs, _ = logged
    for exp_id in plan["experiments"]:
        history = runs[exp_id]["history"]
        assert [(h["_step"], h["train/loss"]) for h in history] == [tuple(p) for p in _loss_curve(exp_id)]
        assert [h["train/lr"] for h in history] == pytest.approx([0.003 * (6 - s) / 5 for s in range(1, 6)])
    extra = [h.get("train/reward_accuracy") for h in runs["sft.tiny.arith.s1"]["history"]]
    assert extra == [None, 0.5, None, 0.75, None]


def test_summary_metrics_are_the_comparison_row(logged):
    results, plan, _, runs, _ = logged
    table = pd.read_csv(results / "summary" / "comparison_by_seed.csv").set_index("experiment")
    for exp_id in plan["experiments"]:
        summary, row = runs[exp_id]["summary"], table.loc[exp_id]
        for key in ("strict_acc", "strict_ci_low", "strict_ci_high", "flexible_acc", "total_kwh_oneoff",
                    "total_kwh_amortised", "teacher_kwh_oneoff", "teacher_kwh_amortised", "train_j_per_token",
                    "train_tokens_per_s", "trained_tokens"):
            assert summary[key] == pytest.approx(float(row[key]), rel=1e-12), (exp_id, key)
        assert summary["train/final_loss"] == _loss_curve(exp_id)[-1][1]
    kd = runs["kd.tiny.arith.temperature-1.s2"]["summary"]
    # two KD students x three seeds share one cache
    assert kd["teacher_kwh_amortised"] == pytest.approx(1500 / 3.6e6)
    assert kd["seed"] == 2 and kd["group"] == "kd.tiny.arith.temperature-1" and kd["verdict"] == "better"
    assert kd["teacher_kwh_oneoff"] == pytest.approx(9000 / 3.6e6)
    assert kd["break_even_reuse"] is None and kd["break_even_reuse_text"] == "never"  # inf is not JSON
    assert runs["sft_gt.tiny.arith.s1"]["summary"]["break_even_reuse_text"] == "n/a"  # the baseline itself


def test_experiment_config_holds_its_plan_sections_and_lineage(logged):
    _, plan, _, runs, _ = logged
    exp_id = "kd.tiny.arith.temperature-2.s3"
    config, exp = runs[exp_id]["config"], plan["experiments"][exp_id]
    assert (config["pipeline"], config["student"], config["dataset"]) == ("kd", "tiny", "arith")
    assert config["lineage"] == exp["lineage"] and config["artifact"] == exp["artifact"]
    assert config["kd"] == exp["sections"]["kd"] and config["training"] == exp["sections"]["training"]
    merged = yaml.safe_load((logged[0] / "config" / "merged_config.yaml").read_text())
    assert config["student_spec"] == merged["students"]["tiny"]


def test_stages_run_logs_every_stage_json_and_the_comparison_table(logged):
    results, plan, _, runs, _ = logged
    tables = runs["stages"]["tables"]
    stages = tables["stages"]
    assert stages["columns"][:3] == ["stage_id", "stage", "role"]
    rows = {r[0]: dict(zip(stages["columns"], r)) for r in stages["data"]}
    assert sorted(rows) == sorted(plan["stage_ids"])
    for stage_id, row in rows.items():
        record = json.loads((results / "energy" / f"{stage_id}.json").read_text())
        assert row["total_j"] == _energy_for(stage_id)
        assert row["status"] == record["status"] == "complete"
        assert row["primary_token_count"] == 1000 and row["gpu_source"] == record["energy"]["sources"]["gpu"]
    comparison = tables["comparison"]
    assert sorted(r[comparison["columns"].index("experiment")] for r in comparison["data"]) == \
        sorted(plan["experiments"])
    measured_kwh = sum(_energy_for(s) for s in plan["stage_ids"]) / 3.6e6
    assert runs["stages"]["summary"]["energy/total_kwh"] == pytest.approx(measured_kwh)
    teacher_kwh = sum(_energy_for(s) for s in plan["stage_ids"] if s.startswith("teacher.")) / 3.6e6
    assert runs["stages"]["summary"]["energy/teacher_kwh"] == pytest.approx(teacher_kwh)


def test_offline_mode_never_contacts_the_backend(logged, wandb_env):
    assert wandb_env == []  # WANDB_BASE_URL points at a trap server: not one connection was made


def test_disabled_mode_writes_nothing(logged, tmp_path):
    results = logged[0]
    assert log_run_to_wandb(results, mode="disabled", dir=tmp_path) == []
    assert not list(tmp_path.rglob("*.wandb"))


def test_missing_rollup_is_named_before_any_run_starts(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "plan.json").write_text(json.dumps({"experiments": {}, "stage_ids": []}))
    with pytest.raises(FileNotFoundError, match="distill-bench rollup"):
        log_run_to_wandb(tmp_path, dir=tmp_path)
    assert not (tmp_path / "wandb").exists()


def test_bad_mode_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="report.wandb.mode"):
        log_run_to_wandb(tmp_path, mode="cloud")


def test_without_wandb_logging_fails_with_the_install_hint(logged, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(WandbNotInstalledError, match=r"pip install 'distill-bench\[wandb\]'"):
        log_run_to_wandb(logged[0], dir=logged[0])
    assert "report.wandb.enabled is true" in wandb_log.MISSING_WANDB


def test_package_and_cli_work_without_wandb_installed(logged):
    """The extra is optional: importing the package and the CLI must not need wandb; only logging does."""
    code = ("import sys; sys.modules['wandb'] = None\n"
            "import distill_bench.report.wandb_log as w, distill_bench.cli\n"
            f"sys.exit(w.wandb_main([{str(logged[0])!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 2
    assert "pip install 'distill-bench[wandb]'" in proc.stderr


def test_cli_prints_the_run_dirs_and_the_sync_command(logged, tmp_path, capsys):
    results = logged[0]
    assert wandb_main([str(results), "--dir", str(tmp_path), "--project", "p2", "--group", "g2"]) == 0
    out = capsys.readouterr().out
    assert "wandb sync" in out
    dirs = [line for line in out.splitlines() if line.startswith(str(tmp_path))]
    assert len(dirs) == len(logged[1]["experiments"]) + 1
    assert {(r["project"], r["group"]) for r in map(read_offline_run, dirs)} == {("p2", "g2")}


def test_config_hook_logs_only_when_enabled(logged, tmp_path, monkeypatch):
    results, wandb = logged[0], sys.modules["wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # disabled must not even need wandb
    assert log_from_config(results, {"report": {"wandb": {"enabled": False}}}) == []
    assert log_from_config(results, {}) == []
    with pytest.raises(WandbNotInstalledError, match="report.wandb.enabled is true"):
        log_from_config(results, {"report": {"wandb": {"enabled": True, "dir": str(tmp_path)}}})
    with pytest.raises(ValueError, match="report.wandb: projct"):
        log_from_config(results, {"report": {"wandb": {"enabled": True, "projct": "x"}}})
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    dirs = log_from_config(results, {"report": {"wandb": {"enabled": True, "project": "p3", "dir": str(tmp_path)}}})
    assert {read_offline_run(d)["project"] for d in dirs} == {"p3"}


def _log_has_exit_record(run_dir: Path) -> bool:
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in wandb_log._records(next(Path(run_dir).glob("*.wandb"))):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "exit":
            return True
    return False


def test_returned_run_dirs_hold_complete_logs_even_when_wandb_flushes_after_finish(logged, tmp_path, monkeypatch):
    """wandb-core may write a run's transaction log out after ``run.finish()`` returns; a loaded machine makes that
    gap long. Stand in a gap of 0.5 s per run (the log holds only its header until then): every returned directory
    must still decode to its named run."""
    wandb, restorers = sys.modules["wandb"], []
    real_init = wandb.init

    def init_with_late_flush(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_finish = run.finish

        def finish(*a, **k):
            real_finish(*a, **k)
            sync_dir = Path(run.settings.sync_dir)
            wait_until = time.monotonic() + 60
            while not _log_has_exit_record(sync_dir):  # the real log, fully written, then held back
                assert time.monotonic() < wait_until, f"{sync_dir} never got its exit record"
                time.sleep(0.02)
            log = next(sync_dir.glob("*.wandb"))
            full = log.read_bytes()
            log.write_bytes(full[:7])
            timer = threading.Timer(0.5, log.write_bytes, args=(full,))
            timer.start()
            restorers.append(timer)

        run.finish = finish
        return run

    monkeypatch.setattr(wandb, "init", init_with_late_flush)
    dirs = log_run_to_wandb(logged[0], mode="offline", dir=tmp_path)
    names = sorted(read_offline_run(d)["name"] for d in dirs)
    for timer in restorers:
        timer.join()
    assert names == sorted(list(logged[1]["experiments"]) + ["stages"])


PARENT_WITH_WANDB = textwrap.dedent("""
    import subprocess, sys, wandb
    run = wandb.init(project="parent", mode="offline", dir=sys.argv[1], reinit="create_new",
                     settings=wandb.Settings(silent=True, x_disable_stats=True, console="off"))
    run.finish()   # the parent's service lives on, its token in the environment its children inherit
    job = subprocess.run([sys.executable, "-c", sys.argv[2], sys.argv[3]], cwd=sys.argv[4], timeout=240)
    sys.exit(job.returncode)
""")


def test_a_job_launched_by_a_process_with_a_live_wandb_service_still_writes_complete_logs(logged, tmp_path):
    """As a Snakemake job launched with ``-d`` from a notebook or test session that used wandb: another working
    directory, a relative W&B dir, and the parent's service token inherited. Its runs must still be written out."""
    job_dir = tmp_path / "job"
    shutil.copytree(logged[0], job_dir / "results")
    job = ("import sys; from distill_bench.report.wandb_log import log_run_to_wandb\n"
           "open('dirs.txt', 'w').write('\\n'.join(log_run_to_wandb('results', dir=sys.argv[1], "
           "flush_timeout_s=20)))")
    parent = subprocess.run([sys.executable, "-c", PARENT_WITH_WANDB, str(tmp_path / "parent"), job, "wandb_out",
                             str(job_dir)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert parent.returncode == 0, parent.stderr[-3000:]
    dirs = (job_dir / "dirs.txt").read_text().split()
    names = sorted(read_offline_run(job_dir / d)["name"] for d in dirs)
    assert names == sorted(list(logged[1]["experiments"]) + ["stages"])
