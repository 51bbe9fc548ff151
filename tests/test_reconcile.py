"""Run-level reconciliation: counter arithmetic (RAPL wrap, a missing GPU, a reset), the invariant naming the
overlapping stages, partial reruns, shared-device rows kept out of N* and the frontier, the run timeline figure."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distill_bench.energy import atomic_write_json, run_counters
from distill_bench.report import reconcile
from distill_bench.report.rollup import rollup_run
from test_energy import fake_gpus, make_rapl
from test_report import _build_run

T0 = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.timezone.utc)
HOST = "node1"


def iso(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def snapshot(t: float, gpus: dict[str, float | None] | None = None, rapl: dict[str, int] | None = None,
             max_uj: int = 10_000_000, errors: dict[str, str] | None = None) -> dict:
    devices = [{"key": k, "index": int(k[3:]), "uuid": f"GPU-{k}", "name": "Fake H100", "energy_j": v,
                "error": (errors or {}).get(k)} for k, v in (gpus or {}).items()]
    zones = [{"name": name, "kind": "dram" if "dram" in name else "package", "energy_uj": uj, "max_range_uj": max_uj}
             for name, uj in (rapl or {}).items()]
    return {"run_id": "r1", "time": iso(t), "host": HOST,
            "gpu": {"available": bool(devices), "error": None if devices else "pynvml not importable",
                    "devices": devices},
            "rapl": {"available": bool(zones), "error": None if zones else "no readable RAPL package zone",
                     "zones": zones}}


def stage(stage_id: str, *attempts: tuple[float, float, dict[str, float]], cpu_j: float = 0.0,
          cpu_source: str = "estimated:cpu_tdp_x_utilisation", host: str = HOST, role: str = "student") -> dict:
    records = []
    for n, (a, b, per_device) in enumerate(attempts, start=1):
        records.append({"attempt": n, "start_time": iso(a), "end_time": iso(b), "duration_s": b - a,
                        "status": "complete", "host": host,
                        "energy": {"per_device_j": per_device,
                                   "components": {"gpu": {"j": sum(per_device.values()),
                                                          "source": "measured:nvml_energy_counter"},
                                                  "cpu": {"j": cpu_j, "source": cpu_source},
                                                  "ram": {"j": 0.0, "source": "estimated:ram_0.375W_per_GB"}}}})
    return {"stage_id": stage_id, "role": role, "attempts": records}


def device(record: dict, name: str) -> dict:
    return next(d for d in record["devices"] if d["device"] == name)


# ------------------------------------------------------------------------------------------------- arithmetic
def test_counter_arithmetic_with_rapl_wrap_and_a_missing_gpu():
    start = snapshot(0, {"gpu0": 1000.0, "gpu1": 2000.0}, {"intel-rapl:0:package-0": 9_000_000})
    # gpu1 fell off the bus; the package counter wrapped at 10 J: 9 J -> 10 J -> 2 J is 3 J
    end = snapshot(100, {"gpu0": 1500.0}, {"intel-rapl:0:package-0": 2_000_000})
    stages = {"a": stage("a", (10, 40, {"gpu0": 200.0}), cpu_j=1.0, cpu_source="measured:rapl"),
              "b": stage("b", (50, 80, {"gpu0": 250.0, "gpu1": 100.0}), cpu_j=1.5, cpu_source="measured:rapl")}
    record = reconcile.reconcile(start, end, stages)
    gpu0 = device(record, "gpu0")
    assert gpu0["status"] == "reconciled" and gpu0["counter_total_j"] == pytest.approx(500.0)
    assert gpu0["stages_j"] == pytest.approx(450.0) and gpu0["unattributed_j"] == pytest.approx(50.0)
    assert gpu0["unattributed_s"] == pytest.approx(40.0) and gpu0["unattributed_share"] == pytest.approx(0.1)
    gpu1 = device(record, "gpu1")
    assert gpu1["status"] == "missing" and "gpu1" in gpu1["reason"] and "end" in gpu1["reason"]
    assert gpu1["counter_total_j"] is None and gpu1["stages_j"] == pytest.approx(100.0) and not gpu1["violation"]
    cpu = device(record, "rapl:cpu")
    assert cpu["counter_total_j"] == pytest.approx(3.0) and cpu["wraps"] == 1
    assert cpu["unattributed_j"] == pytest.approx(0.5)
    assert record["violations"] == []
    line = reconcile.summary_line(record)
    assert "gpu0 stages 450.0 J of 500.0 J counted (90.0 %)" in line and "gpu1 missing" in line
    assert "counter wrapped 1x" in reconcile.markdown(record)


def test_rapl_watch_resolves_more_than_one_wrap():
    start = snapshot(0, rapl={"intel-rapl:0:package-0": 9_000_000})
    end = snapshot(1000, rapl={"intel-rapl:0:package-0": 2_000_000})
    # the watch saw 12 J by its last poll (one wrap, raw value 1 J then); from there to the end read: +1 J
    watch = {"time": iso(995), "interval_s": 10, "total_uj": {"intel-rapl:0:package-0": 12_000_000},
             "last_uj": {"intel-rapl:0:package-0": 1_000_000}}
    cpu = device(reconcile.reconcile(start, end, {}, watch), "rapl:cpu")
    assert cpu["counter_total_j"] == pytest.approx(13.0) and cpu["wraps"] == 2


def test_unreadable_device_and_counter_reset_are_named():
    start = snapshot(0, {"gpu0": 1000.0, "gpu1": 5000.0})
    end = snapshot(60, {"gpu0": None, "gpu1": 10.0}, errors={"gpu0": "counter read failed: GPU is lost"})
    record = reconcile.reconcile(start, end, {"a": stage("a", (5, 50, {"gpu0": 100.0, "gpu1": 100.0}))})
    assert device(record, "gpu0")["status"] == "unreadable" and "GPU is lost" in device(record, "gpu0")["reason"]
    assert device(record, "gpu1")["status"] == "reset" and "went backwards" in device(record, "gpu1")["reason"]
    assert record["violations"] == []


def test_cpu_only_run_says_gpu_unavailable_and_cpu_estimates_cannot_be_reconciled():
    record = reconcile.reconcile(snapshot(0), snapshot(30), {"a": stage("a", (2, 12, {}), cpu_j=40.0),
                                                              "b": stage("b", (15, 25, {}), cpu_j=40.0)})
    gpu, cpu = device(record, "gpu"), device(record, "cpu")
    assert gpu["status"] == "unavailable" and "pynvml" in gpu["reason"]
    assert cpu["status"] == "unavailable" and "estimated:cpu_tdp_x_utilisation" in cpu["reason"]
    assert record["stage_seconds"] == pytest.approx(20.0) and record["unattributed_s"] == pytest.approx(10.0)
    line = reconcile.summary_line(record)
    assert "GPU unavailable" in line and "CPU not reconciled" in line and "20 of 30 s" in line


# -------------------------------------------------------------------------------------------------- invariant
def test_violation_fails_naming_the_overlapping_stages(tmp_path):
    start, end = snapshot(0, {"gpu0": 0.0}), snapshot(100, {"gpu0": 500.0})
    stages = {"teacher.train": stage("teacher.train", (0, 80, {"gpu0": 400.0}), role="setup"),
              "student.train.kd": stage("student.train.kd", (30, 90, {"gpu0": 350.0})),
              "eval.kd": stage("eval.kd", (91, 99, {"gpu0": 20.0}))}
    record = reconcile.reconcile(start, end, stages)
    gpu0 = device(record, "gpu0")
    assert gpu0["violation"] and gpu0["excess_j"] == pytest.approx(270.0)
    with pytest.raises(reconcile.ReconciliationError) as err:
        reconcile.enforce(record, accept_shared=False)
    message = str(err.value)
    assert "teacher.train and student.train.kd overlap by 50.0 s" in message and "eval.kd" not in message
    reconcile.enforce(record, accept_shared=True)   # accepted: recorded, not fatal
    reconcile.write(record, tmp_path)
    assert "**VIOLATION**" in (tmp_path / "reconciliation.md").read_text()


def test_within_tolerance_is_not_a_violation():
    start, end = snapshot(0, {"gpu0": 0.0}), snapshot(100, {"gpu0": 1000.0})
    record = reconcile.reconcile(start, end, {"a": stage("a", (1, 99, {"gpu0": 1004.0}))})   # 0.4 % over
    assert not device(record, "gpu0")["violation"] and device(record, "gpu0")["tolerance_j"] == pytest.approx(5.0)
    record = reconcile.reconcile(start, end, {"a": stage("a", (1, 99, {"gpu0": 1006.0}))})
    assert device(record, "gpu0")["violation"]


# ------------------------------------------------------------------------------------------------ partial rerun
def test_partial_rerun_counts_only_this_runs_attempts():
    start, end = snapshot(1000, {"gpu0": 5000.0}), snapshot(1100, {"gpu0": 5300.0})
    stages = {
        "teacher": stage("teacher", (0, 900, {"gpu0": 4000.0})),                  # earlier run, untouched
        "kd": stage("kd", (100, 200, {"gpu0": 900.0}), (1010, 1090, {"gpu0": 280.0})),   # resumed in this run
        "eval": stage("eval", (1091, 1095, {"gpu0": 10.0}), host="other-node"),   # SLURM: elsewhere
    }
    record = reconcile.reconcile(start, end, stages)
    gpu0 = device(record, "gpu0")
    assert gpu0["stages_j"] == pytest.approx(280.0) and gpu0["unattributed_j"] == pytest.approx(20.0)
    assert record["windows"]["in_run"] == 1 and record["windows"]["stage_ids"] == ["kd"]
    assert record["windows"]["earlier_runs"] == ["kd", "teacher"]
    assert record["windows"]["other_hosts"] == ["eval on other-node"]
    assert "2 stage attempt(s) from earlier runs not counted" in reconcile.summary_line(record)


# ------------------------------------------------------------------------------ counters and the run's snapshots
def test_start_and_end_snapshots_from_fake_nvml_and_rapl(tmp_path, monkeypatch):
    nv = fake_gpus(2)
    root = make_rapl(tmp_path / "powercap", pkg_uj=9_500_000, max_uj=10_000_000, dram=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(run_counters.RUN_ID_ENV, raising=False)
    run_id, path = run_counters.start_run(tmp_path / "results", nvml_module=nv, rapl_root=root, watch=False)
    monkeypatch.setenv(run_counters.RUN_ID_ENV, run_id)   # start_run exported it to this process
    start = json.loads(path.read_text())
    assert [d["energy_j"] for d in start["gpu"]["devices"]] == [1000.0, 1000.0]
    # backdate the start so stage windows fit between it and the end read below
    start["time"] = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=60)).isoformat()
    atomic_write_json(path, start)
    now = dt.datetime.now(dt.timezone.utc)
    def stamp(s):
        return (now + dt.timedelta(seconds=s)).isoformat()

    work = {"s": {"stage_id": "s", "role": "student", "attempts": [
        {"attempt": 1, "start_time": stamp(-50), "end_time": stamp(-10), "host": start["host"], "status": "complete",
         "energy": {"per_device_j": {"gpu0": 400.0},
                    "components": {"cpu": {"j": 0.2, "source": "measured:rapl"}, "ram": {"j": 0, "source": "x"}}}}]}}
    nv.devs[0]["energy_mj"] += 500_000                                   # gpu0: +500 J
    (root / "intel-rapl:0" / "energy_uj").write_text("500000\n")        # wrapped: +1 J
    record = reconcile.reconcile_run(tmp_path / "results", work, nvml_module=nv, rapl_root=root)
    assert device(record, "gpu0")["unattributed_j"] == pytest.approx(100.0)
    assert device(record, "gpu1")["counter_total_j"] == pytest.approx(0.0)
    assert device(record, "rapl:cpu")["counter_total_j"] == pytest.approx(1.0)
    assert (tmp_path / "results" / "energy" / "runs" / run_id / "end.json").exists()
    summary = tmp_path / "results" / "summary"
    assert json.loads((summary / "reconciliation.json").read_text())["run_id"] == run_id
    # re-rolled by hand later (no run id in the environment): the saved end snapshot is reused, not "now"
    monkeypatch.delenv(run_counters.RUN_ID_ENV)
    nv.devs[0]["energy_mj"] += 10_000_000
    again = reconcile.reconcile_run(tmp_path / "results", work, nvml_module=nv, rapl_root=root)
    assert device(again, "gpu0")["counter_total_j"] == pytest.approx(500.0)


def test_rollup_outside_any_run_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv(run_counters.RUN_ID_ENV, raising=False)
    record = reconcile.reconcile_run(tmp_path, {})
    assert record["status"] == "no_run_snapshot"
    assert "not done" in (tmp_path / "summary" / "reconciliation.md").read_text()
    # a finished earlier run exists: a hand-run roll-up re-reads it, the workflow's own roll-up never borrows it
    folder = run_counters.runs_dir(tmp_path) / "r0"
    folder.mkdir(parents=True)
    atomic_write_json(folder / "start.json", snapshot(0, {"gpu0": 0.0}))
    atomic_write_json(folder / "end.json", snapshot(10, {"gpu0": 10.0}))
    assert reconcile.reconcile_run(tmp_path, {})["run_id"] == "r1"
    workflow = reconcile.reconcile_run(tmp_path, {}, in_workflow=True)
    assert workflow["status"] == "no_run_snapshot" and "--no-hooks" in workflow["reason"]


def test_rapl_watch_thread_accumulates_wraps(tmp_path):
    root = make_rapl(tmp_path / "powercap", pkg_uj=9_000_000, max_uj=10_000_000, dram=False)
    watch = run_counters.RaplWatch(tmp_path / "w.json", {"intel-rapl:0:package-0": 9_000_000}, root)
    for raw in (1_000_000, 6_000_000, 2_000_000):          # +2 J (wrap), +5 J, +6 J (wrap)
        (root / "intel-rapl:0" / "energy_uj").write_text(f"{raw}\n")
        watch.poll()
    state = json.loads((tmp_path / "w.json").read_text())
    assert state["total_uj"]["intel-rapl:0:package-0"] == 13_000_000
    assert state["last_uj"]["intel-rapl:0:package-0"] == 2_000_000


# ------------------------------------------------------------------------------------------------ shared device
def _shared_run(tmp_path, monkeypatch, accept: bool, how: str):
    """test_report's run, with KD cheaper than the baseline (finite N*) and the KD teacher cache charged a shared
    device -- by its meter (``sharing``) or found here (its window overlaps KD training's on the same GPU)."""
    results, plan = _build_run(tmp_path)
    if accept:
        cfg = yaml.safe_load((results / "config" / "merged_config.yaml").read_text())
        cfg["energy"]["accept_shared_devices"] = True
        (results / "config" / "merged_config.yaml").write_text(yaml.safe_dump(cfg))
    energy = results / "energy"
    kd_trains = [s for s in plan["stage_ids"] if s.startswith("student.train.kd.") and ".temperature-2." in s]
    kd_train = kd_trains[0]                                     # seed 1: the one found sharing below
    cache = next(s for s in plan["stage_ids"] if s.startswith("teacher.logits."))
    for stage_id in kd_trains:          # every seed: own 700 J < baseline 1200 J
        record = json.loads((energy / f"{stage_id}.json").read_text())
        record["energy"]["total_j"] = 500.0     # N* = ceil((9000 + 900 tau-2 tail) / 500)
        atomic_write_json(energy / f"{stage_id}.json", record)
    now = dt.datetime.now(dt.timezone.utc)
    if how == "meter":
        rec = json.loads((energy / f"{cache}.json").read_text())
        rec["sharing"] = {"checked": True, "shared": True, "unreadable": None,
                          "foreign_processes": [{"pid": 4242, "device": "GPU-gpu0", "stage_id": None,
                                                "overlap_s": 12.0}]}
        rec["energy"]["sources"]["gpu"] = "measured:nvml_energy_counter+shared_device"
        atomic_write_json(energy / f"{cache}.json", rec)
    else:   # both on gpu0 for 20 overlapping seconds, inside a run whose start snapshot saw gpu0
        for stage_id, (a, b) in ((cache, (-80, -40)), (kd_train, (-60, -20))):
            rec = json.loads((energy / f"{stage_id}.json").read_text())
            rec["attempts"][0].update(start_time=(now + dt.timedelta(seconds=a)).isoformat(),
                                      end_time=(now + dt.timedelta(seconds=b)).isoformat())
            rec["attempts"][0]["energy"]["per_device_j"] = {"gpu0": 100.0}
            atomic_write_json(energy / f"{stage_id}.json", rec)
        folder = run_counters.runs_dir(results) / "r-shared"
        folder.mkdir(parents=True)
        start = snapshot(0, {"gpu0": 0.0})
        start.update(time=(now - dt.timedelta(seconds=100)).isoformat(), host=json.loads(
            (energy / f"{cache}.json").read_text())["attempts"][0]["host"])
        atomic_write_json(folder / "start.json", start)
        monkeypatch.setenv(run_counters.RUN_ID_ENV, "r-shared")
        # the end read on this machine finds no GPU: gpu0 is 'missing', but the overlap is still on the record
    table = rollup_run(results, plots=True).set_index("experiment")
    return results, table, kd_train


@pytest.mark.parametrize("how", ["meter", "overlap"])
def test_stage_on_a_shared_device_is_marked_and_kept_out_of_n_star(tmp_path, monkeypatch, how):
    results, table, _ = _shared_run(tmp_path, monkeypatch, accept=False, how=how)
    kd = table[table.pipeline == "kd"]
    assert kd.shared_device.all() and not kd.comparable.any()
    assert kd.break_even_reuse.isna().all(), "a shared-device row gets no N*"
    assert not table.loc["sft_gt.tiny.arith", "shared_device"] and table.loc["sft.tiny.arith", "comparable"]
    assert table.loc["sft.tiny.arith", "break_even_status"] == "worse"   # untouched rows keep theirs
    md = (results / "summary" / "comparison.md").read_text()
    assert "Note: shared device: kd.tiny.arith.temperature-1, kd.tiny.arith.temperature-2" in md
    assert "Reconciliation" in md
    assert (results / "summary" / "pareto.png").stat().st_size > 0


def test_accepted_shared_device_keeps_n_star_and_marks_the_row(tmp_path, monkeypatch):
    _, table, kd_train = _shared_run(tmp_path, monkeypatch, accept=True, how="meter")
    kd = table[table.pipeline == "kd"]
    assert kd.shared_device.all() and kd.comparable.all()
    assert table.loc["kd.tiny.arith.temperature-2", "break_even_reuse"] == 20.0


def test_pareto_frontier_is_drawn_without_rows_that_are_not_comparable(tmp_path, monkeypatch):
    from distill_bench.report import plots

    seen = []
    monkeypatch.setattr(plots, "pareto_front", lambda points: seen.append(sorted(points)) or [])
    frame = pd.DataFrame({"experiment": ["a", "b", "c"], "pipeline": ["sft_gt", "kd", "sft"], "student": "s",
                          "variant": "{}", "total_kwh_oneoff": [0.001, 0.0005, 0.002],
                          "total_kwh_amortised": [0.001, 0.0005, 0.002], "flexible_acc": [0.5, 0.9, 0.6],
                          "flexible_ci_low": 0.0, "flexible_ci_high": 1.0, "comparable": [True, False, True]})
    plots.plot_pareto(frame, tmp_path / "p.png")
    assert seen == [[(pytest.approx(1.0), pytest.approx(50.0)), (pytest.approx(2.0), pytest.approx(60.0))]]


# ------------------------------------------------------------------------------------- the GPU run's own check
def test_gpu_check_compares_stages_with_independent_counters_and_fails_on_excess(tmp_path, capsys):
    from distill_bench.report import run_check

    (tmp_path / "energy").mkdir()
    for record in (stage("a", (10, 40, {"gpu0": 300.0})), stage("b", (50, 80, {"gpu0": 150.0})),
                   stage("old", (-500, -400, {"gpu0": 9999.0}))):          # an earlier run: outside the window
        (tmp_path / "energy" / f"{record['stage_id']}.json").write_text(json.dumps(record))
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"time": iso(0), "devices": {"gpu0": 1000.0}}))
    after = tmp_path / "after.json"
    after.write_text(json.dumps({"time": iso(100), "devices": {"gpu0": 1500.0}}))
    assert run_check.main([str(tmp_path), "--before", str(before), "--after", str(after)]) == 0
    out = capsys.readouterr().out
    assert "independent counter delta 0.50 kJ, stages' GPU energy 0.45 kJ (2 attempts)" in out
    assert "unattributed 0.05 kJ (10.0 %)" in out and "wall time" in out and "100.0 s" in out
    after.write_text(json.dumps({"time": iso(100), "devices": {"gpu0": 1400.0}}))   # stages 450 J > 400 J
    assert run_check.main([str(tmp_path), "--before", str(before), "--after", str(after)]) == 1
    assert "STAGES EXCEED THE COUNTER" in capsys.readouterr().out


def test_rollup_fails_naming_the_stages_when_they_exceed_the_device_counter(tmp_path, monkeypatch):
    from distill_bench.report.reconcile import ReconciliationError

    results, plan = _build_run(tmp_path)
    energy = results / "energy"
    cache = next(s for s in plan["stage_ids"] if s.startswith("teacher.logits."))
    train = "student.train.sft_gt.tiny.arith.s1"
    now = dt.datetime.now(dt.timezone.utc)
    host = json.loads((energy / f"{cache}.json").read_text())["attempts"][0]["host"]
    for stage_id, (a, b) in ((cache, (-80, -40)), (train, (-60, -20))):
        rec = json.loads((energy / f"{stage_id}.json").read_text())
        rec["attempts"][0].update(start_time=(now + dt.timedelta(seconds=a)).isoformat(),
                                  end_time=(now + dt.timedelta(seconds=b)).isoformat())
        rec["attempts"][0]["energy"]["per_device_j"] = {"gpu0": 3000.0}   # each charged the whole device
        atomic_write_json(energy / f"{stage_id}.json", rec)
    folder = run_counters.runs_dir(results) / "r-over"
    folder.mkdir(parents=True)
    start = snapshot(0, {"gpu0": 0.0})
    start.update(time=(now - dt.timedelta(seconds=100)).isoformat(), host=host)
    atomic_write_json(folder / "start.json", start)
    end = snapshot(0, {"gpu0": 5000.0})
    end.update(time=now.isoformat(), host=host)
    monkeypatch.setattr(run_counters, "read_counters", lambda *args, **kwargs: dict(end))
    monkeypatch.setenv(run_counters.RUN_ID_ENV, "r-over")
    with pytest.raises(ReconciliationError, match=rf"{cache} and {train} overlap by 20.0 s"):
        rollup_run(results, plots=False)
    assert "**VIOLATION**" in (results / "summary" / "reconciliation.md").read_text()
    assert not (results / "summary" / "comparison.csv").exists(), "no table from double-counted energy"


def test_run_timeline_draws_gpu_power_of_the_stages_in_this_run(tmp_path):
    from distill_bench.report import plots

    rows = []
    for stage_id, role, (a, b), watts in (("teacher.train", "setup", (5, 40), 300.0),
                                          ("student.train.kd", "student", (48, 80), 200.0),
                                          ("old.stage", "eval", (-300, -200), 999.0)):
        record = stage(stage_id, (a, b, {"gpu0": watts * (b - a)}), role=role)
        record["attempts"][0]["energy"]["total_j"] = watts * (b - a)
        record["power"] = {"timeline": f"{stage_id}.timeline.csv"}
        t = [i * 0.5 for i in range(int((b - a) / 0.5))]
        pd.DataFrame({"attempt": 1, "t_s": t, "gpu0_power_w": watts, "proc_cpu_pct": 100.0}).to_csv(
            tmp_path / f"{stage_id}.timeline.csv", index=False)
        (tmp_path / f"{stage_id}.json").write_text(json.dumps(record))
        rows.append({"stage_id": stage_id, "path": str(tmp_path / f"{stage_id}.json")})
    record = reconcile.reconcile(snapshot(0, {"gpu0": 0.0}), snapshot(100, {"gpu0": 20000.0}),
                                 {r["stage_id"]: json.loads(Path(r["path"]).read_text()) for r in rows})
    seen = {}
    real_bar = plots.plt.Axes.broken_barh

    def spy(self, xranges, yrange, **kw):
        seen.setdefault("bars", []).append(xranges[0])
        return real_bar(self, xranges, yrange, **kw)

    plots.plt.Axes.broken_barh = spy
    try:
        out = plots.plot_run_timeline(pd.DataFrame(rows), tmp_path / "run_timeline.png", record)
    finally:
        plots.plt.Axes.broken_barh = real_bar
    assert out.stat().st_size > 0
    assert seen["bars"] == [(5.0, 35.0), (48.0, 32.0)], "only this run's attempts, on the run's clock"


def test_run_timeline_of_a_gpu_run_with_cpu_only_stages_beside_the_gpu_ones(tmp_path):
    """A GPU run's CPU-only stages (data prep, merges, judges) sample no GPU columns; the picture still draws."""
    from distill_bench.report import plots

    rows = []
    for stage_id, role, (a, b), columns in (("data.prepare", "data", (1, 4), {}),     # first, as in a real run
                                            ("teacher.train", "setup", (5, 40), {"gpu0_power_w": 300.0}),
                                            ("teacher.merge", "teacher", (41, 44), {}),
                                            ("student.train.kd", "student", (48, 80), {"gpu0_power_w": 200.0})):
        record = stage(stage_id, (a, b, {"gpu0": 10.0 * (b - a)} if columns else {}), role=role)
        record["power"] = {"timeline": f"{stage_id}.timeline.csv"}
        t = [i * 0.5 for i in range(int((b - a) / 0.5))]
        pd.DataFrame({"attempt": 1, "t_s": t, **columns, "proc_cpu_pct": 100.0}).to_csv(
            tmp_path / f"{stage_id}.timeline.csv", index=False)
        (tmp_path / f"{stage_id}.json").write_text(json.dumps(record))
        rows.append({"stage_id": stage_id, "path": str(tmp_path / f"{stage_id}.json")})
    record = reconcile.reconcile(snapshot(0, {"gpu0": 0.0}), snapshot(100, {"gpu0": 20000.0}),
                                 {r["stage_id"]: json.loads(Path(r["path"]).read_text()) for r in rows})
    out = plots.plot_run_timeline(pd.DataFrame(rows), tmp_path / "run_timeline.png", record)
    assert out.stat().st_size > 0


def test_run_timeline_caption_never_shows_a_negative_unattributed_power():
    from distill_bench.report.plots import unattributed_caption

    text, mean_w = unattributed_caption({"device": "gpu0", "unattributed_j": 3600.0, "unattributed_s": 36.0})
    assert mean_w == 100.0 and "unattributed 1 Wh over 36 s = 100 W mean" in text
    text, mean_w = unattributed_caption({"device": "gpu0", "unattributed_j": -22700.0, "unattributed_s": 47.0})
    assert mean_w is None and "charged 6.31 Wh more than the device's counter" in text and " W mean" not in text
