"""Energy meter: fake NVML module and fake powercap tree; every written file is schema-validated."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill_bench.energy import (EnergySettings, StageMeter, load_stage_json, measure_idle, run_stage,
                                  validate_stage_dict, write_environment_snapshot)
from distill_bench.energy.cli import measure_main
from distill_bench.energy.rapl import RaplAccumulator, discover, wrap_delta
from distill_bench.energy.validate import load_json

REPO = Path(__file__).resolve().parents[1]
NO_CC = {"codecarbon": False, "sample_interval_s": 0.05}


# ---------------------------------------------------------------------------------------------------- fakes
class FakeNvml:
    """Minimal pynvml stand-in: devices with a settable energy counter (mJ) and power (mW)."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, devices):
        self.devs = [dict(d) for d in devices]
        for i, d in enumerate(self.devs):
            d.setdefault("energy_mj", 1_000_000)
            d.setdefault("power_mw", 100_000)
            d.setdefault("counter", True)
            d.setdefault("fail", False)
            d["index"] = i
        self.mig = {}

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.devs)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.devs[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid in self.mig:
            return {"mig_of": self.mig[uuid]}
        for d in self.devs:
            if d["uuid"] == uuid:
                return d
        raise self.NVMLError("not found")

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h):
        return self.devs[h["mig_of"]]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"]

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not h["counter"]:
            raise self.NVMLError_NotSupported("Not Supported")
        if h["fail"]:
            raise self.NVMLError("GPU is lost")
        return h["energy_mj"]

    def nvmlDeviceGetPowerUsage(self, h):
        if h["fail"]:
            raise self.NVMLError("GPU is lost")
        return h["power_mw"]

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetTemperature(self, h, kind):
        return 40

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("U", (), {"gpu": 97, "memory": 50})()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 2**30, "total": 80 * 2**30})()


def fake_gpus(n=2, **kw):
    return FakeNvml([{"uuid": f"GPU-{c * 8}-{i}", **kw} for i, c in zip(range(n), "abcdefgh")])


def make_rapl(root: Path, pkg_uj=1_000_000, dram_uj=500_000, max_uj=10_000_000, dram=True):
    pkg = root / "intel-rapl:0"
    pkg.mkdir(parents=True)
    (pkg / "name").write_text("package-0\n")
    (pkg / "energy_uj").write_text(f"{pkg_uj}\n")
    (pkg / "max_energy_range_uj").write_text(f"{max_uj}\n")
    if dram:
        d = pkg / "intel-rapl:0:0"
        d.mkdir()
        (d / "name").write_text("dram\n")
        (d / "energy_uj").write_text(f"{dram_uj}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return root


def meter(tmp_path, name="s", settings=None, **kw):
    kw.setdefault("rapl_root", tmp_path / "no-powercap")
    s = dict(NO_CC)
    s.update(settings or {})
    return StageMeter(stage="demo", stage_id=name, role="student", pipeline="sft_gt", experiment="e",
                      out_json=tmp_path / f"{name}.json", settings=s, **kw)


def written(path: Path) -> dict:
    return load_stage_json(path)   # validates against the shipped schema


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "SLURM_LOCALID", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------------------- GPU
def test_counter_deltas_summed_across_devices(tmp_path):
    nv = fake_gpus(2)
    with meter(tmp_path, nvml_module=nv):
        nv.devs[0]["energy_mj"] += 50_000
        nv.devs[1]["energy_mj"] += 25_500
    rec = written(tmp_path / "s.json")
    e = rec["energy"]
    assert e["per_device_j"] == {"gpu0": 50.0, "gpu1": 25.5}
    assert e["gpu_j"] == 75.5
    assert e["sources"]["gpu"] == "measured:nvml_energy_counter"
    assert e["total_j"] == pytest.approx(e["gpu_j"] + e["cpu_j"] + e["ram_j"])
    assert rec["power"]["gpu_peak_w"] == pytest.approx(200.0)   # 2 x 100 W
    header = (tmp_path / "s.timeline.csv").read_text().splitlines()[0]
    assert "gpu0_power_w" in header and "gpu1_power_w" in header
    assert "timeline" not in json.dumps(rec["attempts"])   # samples never embedded


@pytest.mark.parametrize("spec,expected", [("1", ["gpu1"]), ("GPU-bbbbbbbb-1", ["gpu1"]),
                                           ("GPU-cccc,0", ["gpu2", "gpu0"]), ("2,bogus,0", ["gpu2"]), ("", [])])
def test_cuda_visible_devices_by_index_and_uuid(tmp_path, monkeypatch, spec, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    nv = fake_gpus(3)
    with meter(tmp_path, nvml_module=nv):
        for d in nv.devs:
            d["energy_mj"] += 10_000
    rec = written(tmp_path / "s.json")
    assert list(rec["energy"]["per_device_j"]) == expected
    assert rec["energy"]["gpu_j"] == 10.0 * len(expected)
    assert rec["energy"]["sources"]["gpu"] == ("measured:nvml_energy_counter" if expected else "unavailable")


def test_mig_uuid_resolves_to_parent_gpu_and_is_noted(tmp_path, monkeypatch):
    nv = fake_gpus(2)
    nv.mig["MIG-1234"] = 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")
    with meter(tmp_path, nvml_module=nv):
        nv.devs[1]["energy_mj"] += 7_000
    rec = written(tmp_path / "s.json")
    assert rec["energy"]["per_device_j"] == {"gpu1": 7.0}
    dev = rec["devices"]["gpu"]["devices"][0]
    assert dev["mig"] is True and "shared" in dev["note"]


def test_counterless_gpu_falls_back_to_power_integration(tmp_path):
    nv = fake_gpus(1, counter=False, power_mw=100_000)
    with meter(tmp_path, nvml_module=nv):
        time.sleep(0.5)
    rec = written(tmp_path / "s.json")
    assert rec["energy"]["sources"]["gpu"] == "measured:nvml_power_integration"
    # constant 100 W integrated over the sampled window (first sample at start, last at stop): the average over the
    # window is exactly 100 W, and the window (gpu_j / 100 W) covers the 0.5 s of work and lies inside the stage.
    # Bounds from ordering, not a tolerance on how soon a starved sampler thread runs.
    assert rec["power"]["gpu_avg_w"] == pytest.approx(100.0, rel=1e-9)
    assert 0.5 <= rec["energy"]["gpu_j"] / 100.0 <= rec["duration_s"]
    assert rec["devices"]["gpu"]["devices"][0]["energy_counter"] is False


def test_nvml_failing_mid_stage_completes_with_failure_recorded(tmp_path):
    nv = fake_gpus(2)
    with meter(tmp_path, nvml_module=nv):
        time.sleep(0.2)
        nv.devs[1]["fail"] = True
        nv.devs[0]["energy_mj"] += 5_000
        time.sleep(0.2)
    rec = written(tmp_path / "s.json")
    assert rec["status"] == "complete"
    assert rec["energy"]["per_device_source"] == {"gpu0": "measured:nvml_energy_counter",
                                                  "gpu1": "measured:nvml_partial_until_failure"}
    assert rec["energy"]["sources"]["gpu"] == "measured:nvml_partial_until_failure"
    assert any("gpu1" in e and "GPU is lost" in e for e in rec["energy"]["errors"])
    assert "gpu1" in rec["power"]["sampler_errors"]


def test_torch_not_imported_by_the_meter(tmp_path):
    code = ("import sys; from distill_bench.energy import StageMeter\n"
            f"m = StageMeter(stage='x', stage_id='x', role='eval', out_json=r'{tmp_path}/x.json', "
            "settings={'codecarbon': False})\nm.start(); m.stop()\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------- RAPL / CPU
def test_rapl_wraparound_delta():
    assert wrap_delta(9_000_000, 1_000_000, 10_000_000) == 2_000_000
    assert wrap_delta(1_000, 3_000, 10_000_000) == 2_000


def test_rapl_package_and_dram_measured_across_a_wrap(tmp_path):
    root = make_rapl(tmp_path / "powercap", pkg_uj=9_000_000, dram_uj=100, max_uj=10_000_000)
    m = meter(tmp_path, rapl_root=root, nvml_module=fake_gpus(0)).start()
    (root / "intel-rapl:0" / "energy_uj").write_text("1500000\n")        # wrapped: +2.5 J
    (root / "intel-rapl:0" / "intel-rapl:0:0" / "energy_uj").write_text("300100\n")  # +0.3 J
    m.stop()
    e = written(tmp_path / "s.json")["energy"]
    assert e["cpu_j"] == pytest.approx(2.5)
    assert e["ram_j"] == pytest.approx(0.3)
    assert e["sources"]["cpu"] == e["sources"]["ram"] == "measured:rapl"


def test_unreadable_rapl_gives_labelled_cpu_estimate(tmp_path):
    root = make_rapl(tmp_path / "powercap", dram=False)
    energy = root / "intel-rapl:0" / "energy_uj"
    energy.unlink()
    energy.mkdir()   # reading it now fails with an OSError even as root (like a root-only file for a user)
    zones, reason = discover(root)
    assert zones == [] and "energy_uj unreadable" in reason
    with meter(tmp_path, rapl_root=root, nvml_module=fake_gpus(0)):
        start = time.process_time()
        while time.process_time() - start < 0.1:   # well above the 10 ms tick of the CPU-time counters
            sum(range(10_000))
    rec = written(tmp_path / "s.json")
    assert rec["energy"]["sources"]["cpu"] == "estimated:cpu_tdp_x_utilisation"
    assert rec["energy"]["sources"]["ram"] == "estimated:ram_0.375W_per_GB"
    assert rec["energy"]["cpu_j"] > 0 and rec["energy"]["ram_j"] > 0     # never silently zero
    assert "energy_uj unreadable" in rec["devices"]["cpu"]["rapl_error"]
    model = rec["devices"]["cpu"]["estimate_model"]
    assert model["w_per_busy_thread"] == pytest.approx(model["tdp_w_per_package"] * model["packages"]
                                                       / model["logical_cpus"])


def test_cpu_tdp_from_settings_scales_the_estimate(tmp_path):
    rec = {}
    for tdp in (10.0, 1000.0):
        with meter(tmp_path, name=f"t{int(tdp)}", settings={"cpu_tdp_w": tdp}, nvml_module=fake_gpus(0)):
            pass
        rec[tdp] = written(tmp_path / f"t{int(tdp)}.json")["devices"]["cpu"]["estimate_model"]
    assert rec[1000.0]["w_per_busy_thread"] == pytest.approx(100 * rec[10.0]["w_per_busy_thread"])
    assert rec[10.0]["tdp_source"] == "config:energy.cpu_tdp_w"


def test_rapl_accumulator_counts_every_wrap_when_polled(tmp_path):
    root = make_rapl(tmp_path / "pc", pkg_uj=0, dram=False, max_uj=1_000)
    zones, _ = discover(root)
    acc = RaplAccumulator(zones)
    f = root / "intel-rapl:0" / "energy_uj"
    for v in (600, 200, 900, 100):   # three wraps, each between two polls
        f.write_text(str(v))
        acc.poll()
    assert acc.joules("package") == pytest.approx((600 + 600 + 700 + 200) / 1e6)


# ---------------------------------------------------------------------------------------------------- policies
class FakeCodeCarbon:
    def __init__(self, **kw):
        self.output_dir = kw["output_dir"]

    def start(self):
        pass

    def stop(self):
        return {"enabled": True, "error": None, "energy_kwh": 2e-5, "gpu_energy_kwh": 1e-5,
                "cpu_energy_kwh": 0.6e-5, "ram_energy_kwh": 0.4e-5, "emissions_kg": 1e-5}


@pytest.mark.parametrize("policy", ["measured", "gpu_only", "codecarbon"])
def test_policy_selects_total(tmp_path, monkeypatch, policy):
    import distill_bench.energy.codecarbon_adapter as cca

    monkeypatch.setattr(cca, "CodeCarbonAdapter", FakeCodeCarbon)
    nv = fake_gpus(1)
    with meter(tmp_path, settings={"policy": policy, "codecarbon": True}, nvml_module=nv):
        nv.devs[0]["energy_mj"] += 40_000
        sum(range(100_000))
    e = written(tmp_path / "s.json")["energy"]
    assert e["policy"] == policy
    if policy == "measured":
        assert e["total_j"] == pytest.approx(40.0 + e["cpu_j"] + e["ram_j"])
        assert e["sources"]["gpu"] == "measured:nvml_energy_counter"
    elif policy == "gpu_only":
        assert e["total_j"] == 40.0
        assert e["sources"]["cpu"] == "estimated:cpu_tdp_x_utilisation"   # still reported, not summed
    else:
        assert e["total_j"] == pytest.approx(2e-5 * 3.6e6)
        assert e["sources"] == {"gpu": "codecarbon:gpu", "cpu": "codecarbon:cpu", "ram": "codecarbon:ram"}
        assert e["measured_components"]["gpu"]["j"] == 40.0


def test_codecarbon_policy_falls_back_to_measured_when_codecarbon_fails(tmp_path, monkeypatch):
    import distill_bench.energy.codecarbon_adapter as cca

    class Broken(FakeCodeCarbon):
        def stop(self):
            return {"enabled": True, "error": "start: OSError: boom"}

    monkeypatch.setattr(cca, "CodeCarbonAdapter", Broken)
    with meter(tmp_path, settings={"policy": "codecarbon", "codecarbon": True}, nvml_module=fake_gpus(0)):
        pass
    rec = written(tmp_path / "s.json")
    assert rec["status"] == "complete"
    assert rec["codecarbon"]["error"] == "start: OSError: boom"
    assert rec["energy"]["sources"]["cpu"] == "estimated:cpu_tdp_x_utilisation"
    assert any("CodeCarbon gave no figures" in e for e in rec["energy"]["errors"])


def test_real_codecarbon_offline_tracker_runs_in_stage_folder(tmp_path):
    pytest.importorskip("codecarbon")
    with meter(tmp_path, settings={"codecarbon": True}, nvml_module=fake_gpus(0)):
        sum(range(200_000))
    rec = written(tmp_path / "s.json")
    cc = rec["codecarbon"]
    if cc.get("error"):
        pytest.skip(f"CodeCarbon cannot run offline here: {cc['error']}")
    assert (tmp_path / "s.codecarbon").is_dir()
    assert cc["energy_kwh"] is not None and cc["emissions_kg"] is not None
    assert rec["co2_kg"] is not None and rec["co2_kg"] >= 0


# ---------------------------------------------------------------------------------------------------- idle
def test_idle_baseline_subtracted_per_component(tmp_path):
    nv = fake_gpus(2)
    idle = measure_idle(tmp_path / "idle.json", 0.3, {"sample_interval_s": 0.05}, nvml_module=nv,
                        rapl_root=tmp_path / "none")
    load_json(tmp_path / "idle.json", "idle")
    # the fake counter did not move while idle, so the counter says 0 W; use a hand-set baseline instead
    assert idle["components"]["gpu"]["source"] == "measured:nvml_energy_counter"
    idle["gpu_per_device_w"]["gpu0"]["w"] = 20.0
    idle["gpu_per_device_w"]["gpu1"]["w"] = 30.0
    idle["components"]["cpu"]["w"] = 0.5
    (tmp_path / "idle.json").write_text(json.dumps(idle))
    with meter(tmp_path, settings={"idle_json": str(tmp_path / "idle.json")}, nvml_module=nv):
        for d in nv.devs:
            d["energy_mj"] += 100_000
    rec = written(tmp_path / "s.json")
    comp = rec["energy"]["components"]
    dur = rec["duration_s"]
    assert comp["gpu"]["idle_w"] == 50.0
    assert comp["gpu"]["net_j"] == pytest.approx(200.0 - 50.0 * dur)
    assert comp["cpu"]["idle_w"] == 0.5
    assert comp["cpu"]["net_j"] == pytest.approx(comp["cpu"]["j"] - 0.5 * dur)
    assert rec["energy"]["net_j"] == pytest.approx(sum(c["net_j"] for c in comp.values()))
    assert rec["energy"]["idle_w"] == pytest.approx(50.0 + 0.5 + comp["ram"]["idle_w"])


def test_without_idle_json_net_is_null(tmp_path):
    with meter(tmp_path, nvml_module=fake_gpus(1)):
        pass
    e = written(tmp_path / "s.json")["energy"]
    assert e["net_j"] is None and e["idle_w"] is None


def test_idle_counter_power_is_delta_over_time(tmp_path):
    nv = fake_gpus(1)

    class Ticking(FakeNvml):
        def nvmlDeviceGetTotalEnergyConsumption(self, h):
            h["energy_mj"] += 1_000    # 1 J per read
            return h["energy_mj"]

    tick = Ticking(nv.devs)
    rec = measure_idle(tmp_path / "idle.json", 0.2, {"sample_interval_s": 0.05}, nvml_module=tick,
                       rapl_root=tmp_path / "none")
    # reads: probe at open, start, end -> 1 J between start and end
    assert rec["gpu_per_device_w"]["gpu0"]["w"] == pytest.approx(1.0 / rec["seconds"])


# ---------------------------------------------------------------------------------------------------- attempts
SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from distill_bench.energy import run_stage

    out, mode = Path(sys.argv[1]), sys.argv[2]

    def work(meter):
        meter.add_tokens("trained_tokens", 100)
        meter.set_primary_tokens("trained_tokens")
        if mode == "hang":
            (out.parent / "ready").write_text("1")
            time.sleep(60)
        return 0

    run_stage(stage="train_student", stage_id="student.x", role="student", pipeline="kd", experiment="kd.x",
              artifact=None, out_json=out, settings={"codecarbon": False, "sample_interval_s": 0.05}, fn=work)
""")


def test_sigterm_writes_interrupted_then_next_attempt_appends(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT)
    out = tmp_path / "energy" / "student.x.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(script), str(out), "hang"], env=env)
    deadline = time.monotonic() + 30
    while not (tmp_path / "energy" / "ready").exists():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    first = written(out)
    assert first["status"] == "interrupted" and len(first["attempts"]) == 1
    assert first["tokens"]["counts"] == {"trained_tokens": 100}
    assert "SystemExit" in first["error"]

    assert subprocess.run([sys.executable, str(script), str(out), "quick"], env=env).returncode == 0
    second = written(out)
    assert second["status"] == "complete"
    assert [a["status"] for a in second["attempts"]] == ["interrupted", "complete"]
    assert [a["attempt"] for a in second["attempts"]] == [1, 2]
    assert second["duration_s"] == pytest.approx(sum(a["duration_s"] for a in second["attempts"]))
    assert second["energy"]["total_j"] == pytest.approx(sum(a["energy"]["total_j"] for a in second["attempts"]))
    assert second["tokens"]["counts"] == {"trained_tokens": 200}
    assert second["start_time"] == first["start_time"]
    rows = (out.parent / "student.x.timeline.csv").read_text().splitlines()
    assert rows[0].startswith("attempt,") and {r.split(",")[0] for r in rows[1:]} == {"1", "2"}

    # a complete record is replaced, not appended to
    assert subprocess.run([sys.executable, str(script), str(out), "quick"], env=env).returncode == 0
    assert len(written(out)["attempts"]) == 1


def test_exception_marks_failed_and_reraises(tmp_path):
    def boom(meter):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run_stage(stage="demo", stage_id="f", role="eval", pipeline="shared", experiment=None, artifact=None,
                  out_json=tmp_path / "f.json", settings=NO_CC, fn=boom)
    rec = written(tmp_path / "f.json")
    assert rec["status"] == "failed" and "RuntimeError: disk full" in rec["error"]


def test_keyboard_interrupt_marks_interrupted(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with meter(tmp_path, nvml_module=fake_gpus(0)):
            raise KeyboardInterrupt
    assert written(tmp_path / "s.json")["status"] == "interrupted"


def test_running_snapshot_is_valid_while_the_stage_runs(tmp_path):
    seen = {}

    def work(meter):
        meter.add_tokens("generated_tokens", 5)
        seen["rec"] = load_stage_json(tmp_path / "r.json")

    run_stage(stage="demo", stage_id="r", role="teacher", pipeline="shared", experiment=None, artifact="syn1",
              out_json=tmp_path / "r.json", settings=NO_CC, fn=work)
    assert seen["rec"]["status"] == "running" and seen["rec"]["attempts"][0]["status"] == "running"
    assert written(tmp_path / "r.json")["artifact"] == "syn1"


def test_periodic_snapshot_replaces_json_while_running(tmp_path):
    m = meter(tmp_path, settings={"snapshot_interval_s": 0.1}, nvml_module=fake_gpus(0)).start()
    m.add_tokens("trained_tokens", 7)
    deadline = time.monotonic() + 20
    while written(tmp_path / "s.json")["tokens"]["counts"].get("trained_tokens") != 7:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert written(tmp_path / "s.json")["status"] == "running"
    m.stop()
    assert written(tmp_path / "s.json")["status"] == "complete"


# ---------------------------------------------------------------------------------------------------- multi-process
@pytest.mark.parametrize("env,explicit,measures", [({"LOCAL_RANK": "1"}, None, False),
                                                   ({"SLURM_LOCALID": "2"}, None, False),
                                                   ({"LOCAL_RANK": "0", "SLURM_LOCALID": "3"}, None, True),
                                                   ({}, False, False), ({"LOCAL_RANK": "1"}, True, True)])
def test_only_one_meter_per_node_measures(tmp_path, monkeypatch, env, explicit, measures):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nv = fake_gpus(1)
    with meter(tmp_path, nvml_module=nv, is_measuring_process=explicit) as m:
        m.add_tokens("trained_tokens", 3)
        m.mark_steady_state()
    assert (tmp_path / "s.json").exists() is measures
    assert list(tmp_path.glob("s.*")) == ([] if not measures else list(tmp_path.glob("s.*")))
    assert m.elapsed_s >= 0


# ---------------------------------------------------------------------------------------------------- tokens
def test_tokens_throughput_and_steady_state(tmp_path):
    nv = fake_gpus(1)
    with meter(tmp_path, nvml_module=nv, settings={"policy": "gpu_only"}) as m:
        m.add_tokens("trained_tokens", 100)
        nv.devs[0]["energy_mj"] += 10_000
        m.mark_steady_state()
        m.add_tokens("trained_tokens", 300)
        m.add_tokens("input_tokens", 5)
        m.set_primary_tokens("trained_tokens")
        nv.devs[0]["energy_mj"] += 30_000
        m.record("final_loss", 0.41)
    rec = written(tmp_path / "s.json")
    assert rec["tokens"] == {"counts": {"trained_tokens": 400, "input_tokens": 5}, "primary": "trained_tokens"}
    assert rec["throughput"]["j_per_token"] == pytest.approx(40.0 / 400)
    assert rec["throughput"]["tokens_per_s"] == pytest.approx(400 / rec["duration_s"])
    st = rec["throughput"]["steady_state"]
    assert st["tokens"] == 300 and st["j"] == pytest.approx(30.0) and st["j_per_token"] == pytest.approx(0.1)
    assert rec["metrics"] == {"final_loss": 0.41}


@pytest.mark.parametrize("kind,n,exc", [("t", 1.5, TypeError), ("t", -1, ValueError), ("t", True, TypeError),
                                        ("bad kind", 1, ValueError)])
def test_add_tokens_rejects_inexact_counts(tmp_path, kind, n, exc):
    m = meter(tmp_path, nvml_module=fake_gpus(0))
    with pytest.raises(exc):
        m.add_tokens(kind, n)


def test_record_rejects_non_json(tmp_path):
    with pytest.raises(ValueError, match="not JSON"):
        meter(tmp_path).record("x", object())


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("d,match", [({"policy": "guess"}, "energy.policy"),
                                     ({"sample_interval_s": -1}, "energy.sample_interval_s"),
                                     ({"sample_interval_s": 0}, "energy.sample_interval_s"),
                                     ({"snapshot_interval_s": "x"}, "energy.snapshot_interval_s"),
                                     ({"cpu_tdp_w": -5}, "energy.cpu_tdp_w"),
                                     ({"polcy": "measured"}, "energy.polcy"),
                                     ({"policy": "codecarbon", "codecarbon": False}, "energy.codecarbon")])
def test_bad_settings_name_the_key(d, match):
    with pytest.raises(ValueError, match=match):
        EnergySettings.from_dict(d)


def test_workflow_config_energy_section_is_accepted():
    import yaml

    cfg = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    s = EnergySettings.from_dict(cfg["energy"])
    assert s.policy == "measured" and s.sample_interval_s == 0.1


def test_unwritable_output_dir_fails_before_the_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    called = []
    with pytest.raises(PermissionError, match="not writable"):
        run_stage(stage="demo", stage_id="u", role="eval", pipeline="shared", experiment=None, artifact=None,
                  out_json=blocker / "sub" / "u.json", settings=NO_CC, fn=lambda meter: called.append(1))
    assert called == []


def test_newer_schema_version_is_a_clear_error(tmp_path):
    with meter(tmp_path, nvml_module=fake_gpus(0)):
        pass
    rec = written(tmp_path / "s.json")
    rec["schema_version"] = 2
    (tmp_path / "new.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=r"new\.json.*schema_version 2 is newer"):
        load_stage_json(tmp_path / "new.json")
    del rec["energy"]["sources"]
    rec["schema_version"] = 1
    with pytest.raises(ValueError, match="energy.*sources"):
        validate_stage_dict(rec, "x.json")


def test_bad_role_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="role"):
        StageMeter(stage="a", stage_id="a", role="teacherz", out_json=tmp_path / "a.json")


# ---------------------------------------------------------------------------------------------------- CLI / env
@pytest.mark.parametrize("code", [0, 3])
def test_measure_cli_propagates_exit_code(tmp_path, monkeypatch, code):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # no GPU for this job whatever the host has
    out = tmp_path / "m.json"
    child = (f"import json, os; sum(range(2 * 10**6)); "
             f"json.dump({{'generated_tokens': 12}}, open(os.environ['DISTILL_BENCH_TOKENS_FILE'], 'w')); "
             f"raise SystemExit({code})")
    rc = measure_main(["--stage", "demo", "--out", str(out), "--no-codecarbon", "--primary-tokens",
                       "generated_tokens", "--", sys.executable, "-c", child])
    assert rc == code
    rec = written(out)
    assert rec["status"] == ("complete" if code == 0 else "failed")
    assert rec["metrics"]["exit_code"] == code
    assert rec["energy"]["sources"]["gpu"] == "unavailable"
    assert rec["energy"]["sources"]["cpu"].startswith(("estimated:", "measured:rapl"))
    assert rec["energy"]["cpu_j"] > 0        # the child's CPU time is in the process tree
    assert rec["tokens"]["counts"] == {"generated_tokens": 12}


def test_measure_cli_missing_command_fails_with_127(tmp_path):
    out = tmp_path / "m.json"
    rc = measure_main(["--stage", "demo", "--out", str(out), "--no-codecarbon", "--", "/nonexistent/cmd"])
    assert rc == 127 and written(out)["status"] == "failed"


def test_measure_cli_forwards_sigterm_to_child(tmp_path):
    out = tmp_path / "m.json"
    ready = tmp_path / "ready"
    child = f"import time, pathlib; pathlib.Path(r'{ready}').write_text('1'); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-m", "distill_bench", "measure", "--stage", "srv", "--out", str(out),
                          "--no-codecarbon", "--", sys.executable, "-c", child],
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    rec = written(out)
    assert rec["status"] == "interrupted" and rec["metrics"]["child_signal"] == "SIGTERM"


def test_idle_and_env_files_validate(tmp_path):
    rec = write_environment_snapshot(tmp_path / "env.json", nvml_module=fake_gpus(1))
    load_json(tmp_path / "env.json", "environment")
    assert rec["gpus"]["devices"][0]["uuid"] == "GPU-aaaaaaaa-0"
    assert "torch" in rec["packages"] and "git" in rec
    with meter(tmp_path, settings={"environment_json": str(tmp_path / "env.json")}, nvml_module=fake_gpus(0)):
        pass
    assert written(tmp_path / "s.json")["environment"] == str(tmp_path / "env.json")


def test_process_tree_is_listed_at_most_once_per_refresh_interval(monkeypatch):
    """Listing descendants reads all of /proc; the sampler's per-tick readings reuse the list between refreshes."""
    from distill_bench.energy import cpu_estimate

    psutil = pytest.importorskip("psutil")
    calls = []
    real_children = psutil.Process.children
    monkeypatch.setattr(psutil.Process, "children", lambda self, **kw: calls.append(1) or real_children(self, **kw))
    monkeypatch.setattr(cpu_estimate, "_tree_cache", {"pid": None, "at": -float("inf"), "procs": []})
    for _ in range(20):
        cpu_estimate.process_tree_cpu_seconds()
        cpu_estimate.process_tree_rss_bytes()
    assert len(calls) == 1


def test_child_found_one_refresh_late_is_counted_with_all_its_cpu_seconds(monkeypatch):
    from distill_bench.energy import cpu_estimate

    pytest.importorskip("psutil")
    monkeypatch.setattr(cpu_estimate, "TREE_REFRESH_S", 0.2)
    monkeypatch.setattr(cpu_estimate, "_tree_cache", {"pid": None, "at": -float("inf"), "procs": []})
    before = cpu_estimate.process_tree_cpu_seconds()            # lists the tree: no child yet
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.3)
            if cpu_estimate.process_tree_cpu_seconds() - before >= 1.0:
                break
        assert cpu_estimate.process_tree_cpu_seconds() - before >= 1.0, "the live child's CPU seconds are counted"
    finally:
        child.kill()
        child.wait()
