"""GPU leases, shared-device detection and the meter's ledger: CPU only, with fake NVMLs (the in-process one of
test_energy and a file-backed ``pynvml`` module that whole subprocesses import through PYTHONPATH)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill_bench.energy import StageMeter, load_stage_json
from distill_bench.energy import lease as lease_mod
from distill_bench.energy.lease import LeasedDevice, LeaseError, acquire
from distill_bench.energy.meter import ledger_path_for

REPO = Path(__file__).resolve().parents[1]
FAKE_PYNVML = REPO / "tests" / "fixtures" / "fake_pynvml"
NO_CC = {"codecarbon": False, "sample_interval_s": 0.05}
TWO = [LeasedDevice(0, "GPU-fake-0"), LeasedDevice(1, "GPU-fake-1")]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "SLURM_LOCALID", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)


def fake_env(tmp_path: Path, gpus: str, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{FAKE_PYNVML}{os.pathsep}{REPO}", "FAKE_NVML_GPUS": gpus,
            "FAKE_NVML_STATE": str(tmp_path / "nvml"), **extra}


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------- leases
WORKER = textwrap.dedent("""
    import json, os, random, sys, time
    from distill_bench.energy.lease import LeasedDevice, acquire
    lock_dir, log_path, mode, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    devices = [LeasedDevice(0, "GPU-fake-0"), LeasedDevice(1, "GPU-fake-1")]
    rng = random.Random(os.getpid())
    with open(log_path, "a") as log:
        for _ in range(rounds):
            lease = acquire(1, stage_id=f"w{os.getpid()}", lock_dir=lock_dir, devices=devices, poll_s=0.01)
            uuid = lease.devices[0].uuid
            log.write(json.dumps(["acq", uuid, os.getpid(), time.time()]) + "\\n"); log.flush()
            if mode == "hold":
                time.sleep(120)        # killed by the test while holding the lease
            time.sleep(rng.uniform(0.005, 0.04))
            log.write(json.dumps(["rel", uuid, os.getpid(), time.time()]) + "\\n"); log.flush()
            lease.release()
""")


def test_leases_never_give_one_device_to_two_live_processes(tmp_path):
    """12 processes contend for 2 devices; 3 more are SIGKILLed while holding one. Every logged holding interval
    of a device is disjoint from every other process's, and afterwards both devices are free again."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    lock_dir = tmp_path / "locks"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = [tmp_path / f"w{i}.log" for i in range(15)]
    procs = [subprocess.Popen([sys.executable, str(script), str(lock_dir), str(logs[i]), "cycle", "6"], env=env)
             for i in range(12)]
    intervals = []   # (uuid, pid, start, end)
    for i in range(12, 15):
        p = subprocess.Popen([sys.executable, str(script), str(lock_dir), str(logs[i]), "hold", "1"], env=env)
        wait_for(lambda i=i: logs[i].exists() and logs[i].read_text().strip(), what=f"holder {i} to lease")
        _, uuid, pid, t = json.loads(logs[i].read_text().splitlines()[0])
        time.sleep(0.1)
        # The lock file's holder record still names this live process: it holds the device at least until now.
        # (A clock read after the kill is no bound: the kernel drops the flock at exit, before wait() returns, so
        # the next holder may log its acquisition before this process reads the clock.)
        holder = json.loads((lock_dir / f"{uuid}.lock").read_text())
        assert holder["pid"] == pid and holder["stage_id"] == f"w{pid}"
        held_until = time.time()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        intervals.append((uuid, pid, t, held_until))
    for p in procs:
        assert p.wait(timeout=120) == 0
    for path in logs[:12]:
        open_acq = {}
        for line in path.read_text().splitlines():
            kind, uuid, pid, t = json.loads(line)
            if kind == "acq":
                open_acq[uuid] = t
            else:
                intervals.append((uuid, pid, open_acq.pop(uuid), t))
    assert len(intervals) == 12 * 6 + 3
    for uuid in ("GPU-fake-0", "GPU-fake-1"):
        mine = sorted((s, e, pid) for u, pid, s, e in intervals if u == uuid)
        for (s1, e1, p1), (s2, _e2, p2) in zip(mine, mine[1:]):
            assert s2 >= e1, f"{uuid} held by {p1} [{s1:.3f}, {e1:.3f}] and {p2} from {s2:.3f}"
    # the SIGKILLed holders left no stale lease: both devices can be leased at once, right away
    lease = acquire(2, lock_dir=lock_dir, devices=TWO, timeout_s=5)
    assert sorted(d.uuid for d in lease.devices) == ["GPU-fake-0", "GPU-fake-1"]
    lease.release()


def test_lease_waits_for_a_held_device_and_records_the_wait(tmp_path):
    first = acquire(1, lock_dir=tmp_path, devices=TWO[:1], stage_id="a")
    holder = json.loads((tmp_path / "GPU-fake-0.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["stage_id"] == "a"
    ready = tmp_path / "ready"
    # ``ready`` is written at the child's first poll sleep, i.e. once acquire() has started its clock and been
    # refused: everything the parent does after seeing it lies inside the measured wait (ordering, not timing).
    code = ("import pathlib, time; from distill_bench.energy import lease\n"
            "real_sleep = time.sleep\n"
            f"def first_refusal(s): pathlib.Path(r'{ready}').write_text('1'); real_sleep(s)\n"
            "time.sleep = first_refusal\n"
            f"l = lease.acquire(1, lock_dir=r'{tmp_path}', devices=[lease.LeasedDevice(0, 'GPU-fake-0')], "
            "poll_s=0.01)\n"
            "print(l.waited_s)")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, text=True)
    wait_for(ready.exists, what="the second process to ask")
    time.sleep(0.6)
    assert p.poll() is None, "a second process got a device that is leased"
    first.release()
    out, _ = p.communicate(timeout=30)
    assert float(out) >= 0.6     # the whole 0.6 s the parent held on after the first refusal
    described = first.describe()
    assert described["devices"] == [{"index": 0, "uuid": "GPU-fake-0"}] and described["lock_dir"] == str(tmp_path)


def test_multi_gpu_lease_is_all_or_nothing_and_sets_cuda_visible_devices(tmp_path):
    env: dict = {}
    lease = acquire(2, lock_dir=tmp_path, devices=TWO)
    lease.apply_to_environ(env)
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    with pytest.raises(TimeoutError):
        acquire(1, lock_dir=tmp_path, devices=TWO, timeout_s=0.3)
    lease.release()
    assert acquire(1, lock_dir=tmp_path, devices=TWO, timeout_s=1).devices[0].uuid == "GPU-fake-0"


def test_default_lock_dir_is_shared_in_the_system_temp_directory(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert lease_mod.default_lock_dir() == tmp_path / "distill-bench-gpu-locks"
    lease = acquire(1, devices=TWO)
    assert oct((tmp_path / "distill-bench-gpu-locks").stat().st_mode & 0o7777) == "0o1777"
    assert lease.describe()["lock_dir"] == str(tmp_path / "distill-bench-gpu-locks")
    lease.release()


def test_accept_shared_devices_is_a_roll_up_key_the_meter_ignores():
    from distill_bench.energy import EnergySettings

    assert EnergySettings.from_dict({"accept_shared_devices": True, "lock_dir": "/x"}).lock_dir == "/x"


def test_lock_dir_without_working_locks_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "_flock", lambda fd, op: None)   # a filesystem where flock silently succeeds
    with pytest.raises(LeaseError, match=r"energy.lock_dir .*file locks do not work"):
        acquire(1, lock_dir=tmp_path / "nfs", devices=TWO)


def test_lock_dir_refusing_locks_is_a_clear_error(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lease_mod, "_flock", no_locks)
    with pytest.raises(LeaseError, match=r"energy.lock_dir .*cannot use file locks.*No locks available"):
        acquire(1, lock_dir=tmp_path, devices=TWO)


def test_unwritable_lock_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LeaseError, match="energy.lock_dir"):
        acquire(1, lock_dir=blocker / "locks", devices=TWO)


def test_more_gpus_than_visible_names_the_rule(tmp_path):
    with pytest.raises(LeaseError, match=r"rule 'train_student' asks for 3 GPU\(s\) but only 2 are visible"):
        acquire(3, lock_dir=tmp_path, devices=TWO, rule="train_student")


def test_visible_gpus_respect_cuda_visible_devices(tmp_path):
    env = fake_env(tmp_path, "GPU-fake-0,GPU-fake-1,GPU-fake-2", CUDA_VISIBLE_DEVICES="2,0")
    code = "from distill_bench.energy.lease import visible_gpus; print([(d.index, d.uuid) for d in visible_gpus()])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[(2, 'GPU-fake-2'), (0, 'GPU-fake-0')]"


# ---------------------------------------------------------------------------------------------------- sharing
STAGE = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    from distill_bench.energy import run_stage
    from distill_bench.energy.lease import LeasedDevice, acquire
    out, name, own_device, child = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "child"
    state = Path(os.environ["FAKE_NVML_STATE"])
    # a lease on a device it does not meter, so its lock note names this stage (as a workflow stage's would)
    lease = acquire(1, stage_id=name, lock_dir=os.environ["LOCKS"], devices=[LeasedDevice(1, own_device)])
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"          # ... but it runs on (and meters) device 0
    def work(meter):
        user = os.getpid()
        helper = None
        if child:   # our own child process on the device must not count as sharing
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            user = helper.pid
        (state / "GPU-fake-0").mkdir(parents=True, exist_ok=True)
        (state / "GPU-fake-0" / str(user)).write_text(name)
        (state / f"{name}.ready").write_text("1")
        while len(list(state.glob("*.ready"))) < 2:
            time.sleep(0.02)
        time.sleep(2.5)
        (state / "GPU-fake-0" / str(user)).unlink()
        if helper is not None:
            helper.kill()
    run_stage(stage="demo", stage_id=name, role="teacher", out_json=out,
              settings={"codecarbon": False, "sample_interval_s": 0.05, "lock_dir": os.environ["LOCKS"]}, fn=work)
""")


def test_two_overlapping_stages_on_one_device_are_detected_and_labelled_in_both(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    env = fake_env(tmp_path, "GPU-fake-0,GPU-fake-1,GPU-fake-2", LOCKS=str(tmp_path / "locks"))
    a = subprocess.Popen([sys.executable, str(script), str(tmp_path / "a.json"), "stage.a", "GPU-fake-1", "child"],
                         env=env)
    b = subprocess.Popen([sys.executable, str(script), str(tmp_path / "b.json"), "stage.b", "GPU-fake-2", "self"],
                         env=env)
    assert a.wait(timeout=60) == 0 and b.wait(timeout=60) == 0
    ra, rb = load_stage_json(tmp_path / "a.json"), load_stage_json(tmp_path / "b.json")
    for rec, other, _other_pid_is_child in ((ra, "stage.b", False), (rb, "stage.a", True)):
        sharing = rec["sharing"]
        assert sharing["checked"] is True and sharing["shared"] is True and sharing["unreadable"] is None
        (foreign,) = sharing["foreign_processes"]
        assert foreign["device"] == "GPU-fake-0" and foreign["stage_id"] == other
        assert 1.0 <= foreign["overlap_s"] <= rec["duration_s"]
        assert rec["energy"]["sources"]["gpu"] == "measured:nvml_energy_counter+shared_device"
        assert rec["energy"]["per_device_source"] == {"gpu0": "measured:nvml_energy_counter+shared_device"}
        assert rec["attempts"][-1]["sharing"]["shared"] is True
    # a's own child on the device is a's, not foreign: b saw a's child (a descendant of a's leased process)
    assert ra["sharing"]["foreign_processes"][0]["pid"] == b.pid
    assert rb["sharing"]["foreign_processes"][0]["pid"] != a.pid


def test_a_stage_alone_on_its_device_is_checked_and_not_shared(tmp_path, monkeypatch):
    from test_energy import fake_gpus

    nv = fake_gpus(1)
    nv.procs = {}
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [type("P", (), {"pid": os.getpid()})()]
    with StageMeter(stage="demo", stage_id="solo", role="eval", out_json=tmp_path / "solo.json", settings=NO_CC,
                    nvml_module=nv, rapl_root=tmp_path / "none"):
        time.sleep(1.2)
    rec = load_stage_json(tmp_path / "solo.json")
    assert rec["sharing"] == {**rec["sharing"], "checked": True, "shared": False, "foreign_processes": [],
                              "unreadable": None}
    assert rec["sharing"]["polls"] >= 2
    assert rec["energy"]["sources"]["gpu"] == "measured:nvml_energy_counter"


def test_unlistable_processes_leave_sharing_unchecked_with_the_reason(tmp_path):
    from test_energy import fake_gpus

    nv = fake_gpus(1)

    def not_supported(h):
        raise nv.NVMLError_NotSupported("Not Supported")

    nv.nvmlDeviceGetComputeRunningProcesses = not_supported
    with StageMeter(stage="demo", stage_id="vgpu", role="eval", out_json=tmp_path / "v.json", settings=NO_CC,
                    nvml_module=nv, rapl_root=tmp_path / "none"):
        pass
    sharing = load_stage_json(tmp_path / "v.json")["sharing"]
    assert sharing["checked"] is False and sharing["shared"] is False
    assert "gpu0" in sharing["unreadable"] and "Not Supported" in sharing["unreadable"]


def test_cpu_only_stage_records_sharing_as_not_checked(tmp_path):
    with StageMeter(stage="demo", stage_id="cpu", role="data", out_json=tmp_path / "c.json", settings=NO_CC,
                    devices="", rapl_root=tmp_path / "none"):
        pass
    rec = load_stage_json(tmp_path / "c.json")
    assert rec["sharing"]["checked"] is False and rec["sharing"]["unreadable"] == "no NVML device metered"
    assert rec["lease"] is None


def test_nvml_failing_mid_run_names_the_device_it_could_not_read(tmp_path):
    from test_energy import fake_gpus

    nv = fake_gpus(2)
    with StageMeter(stage="demo", stage_id="lost", role="eval", out_json=tmp_path / "l.json", settings=NO_CC,
                    nvml_module=nv, rapl_root=tmp_path / "none"):
        time.sleep(0.2)
        nv.devs[1]["fail"] = True
        time.sleep(0.2)
    rec = load_stage_json(tmp_path / "l.json")
    assert rec["status"] == "complete"
    (bad,) = rec["energy"]["unreadable_devices"]
    assert bad["device"] == "gpu1" and bad["uuid"] == "GPU-bbbbbbbb-1" and "GPU is lost" in bad["reason"]


# ---------------------------------------------------------------------------------------------------- meter fixes
def test_rapl_baseline_is_read_after_codecarbon_starts(tmp_path, monkeypatch):
    """CodeCarbon's start-up (seconds of CPU on some hosts) happens before the window: it must not be in cpu_j."""
    from distill_bench.energy import codecarbon_adapter
    from test_energy import make_rapl

    root = make_rapl(tmp_path / "powercap", pkg_uj=1_000_000, dram=False)
    counter = root / "intel-rapl:0" / "energy_uj"

    class SlowStartCodeCarbon:
        def __init__(self, **kw):
            pass

        def start(self):   # burns 50 J of package energy while starting
            counter.write_text(f"{int(counter.read_text()) + 50_000_000}\n")

        def stop(self):
            return {"error": "fake", "energy_kwh": None}

    monkeypatch.setattr(codecarbon_adapter, "CodeCarbonAdapter", SlowStartCodeCarbon)
    with StageMeter(stage="demo", stage_id="cc", role="eval", out_json=tmp_path / "cc.json",
                    settings={"codecarbon": True, "sample_interval_s": 0.05}, devices="", rapl_root=root):
        counter.write_text(f"{int(counter.read_text()) + 2_000_000}\n")   # the stage's own 2 J
    assert load_stage_json(tmp_path / "cc.json")["energy"]["cpu_j"] == pytest.approx(2.0)


def test_idle_rapl_baseline_is_read_as_the_window_opens(tmp_path, monkeypatch):
    from distill_bench.energy import cpu_estimate, measure_idle
    from test_energy import make_rapl

    root = make_rapl(tmp_path / "powercap", pkg_uj=1_000_000, dram=False)
    counter = root / "intel-rapl:0" / "energy_uj"
    real_model = cpu_estimate.cpu_power_model

    def slow_model(tdp):   # work done while setting up, before the idle window opens: 100 J
        counter.write_text(f"{int(counter.read_text()) + 100_000_000}\n")
        return real_model(tdp)

    monkeypatch.setattr(cpu_estimate, "cpu_power_model", slow_model)
    rec = measure_idle(tmp_path / "idle.json", seconds=0.3, settings=NO_CC, nvml_module=None, devices="",
                       rapl_root=root)
    assert rec["components"]["cpu"]["w"] < 10.0   # 100 J over 0.3 s would read as > 300 W


MEASURE_CHILD = "import time, sys; time.sleep(float(sys.argv[1]))"


def test_two_measure_processes_on_one_stage_json_keep_both_attempts(tmp_path):
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "distill_bench", "measure", "--stage", "dup", "--out", str(out), "--no-codecarbon",
           "--interval", "0.05", "--"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    p1 = subprocess.Popen([*cmd, sys.executable, "-c", MEASURE_CHILD, "2.0"], env=env)
    wait_for(lambda: out.exists(), what="first attempt to start")
    p2 = subprocess.Popen([*cmd, sys.executable, "-c", MEASURE_CHILD, "0.5"], env=env)
    assert p2.wait(timeout=60) == 0 and p1.wait(timeout=60) == 0
    rec = load_stage_json(out)
    assert sorted(a["attempt"] for a in rec["attempts"]) == [1, 2]
    assert {a["pid"] for a in rec["attempts"]} == {p1.pid, p2.pid}
    assert all(a["status"] == "complete" for a in rec["attempts"])
    assert rec["duration_s"] == pytest.approx(sum(a["duration_s"] for a in rec["attempts"]))
    assert rec["duration_s"] >= 2.5


SIGKILL_STAGE = textwrap.dedent("""
    import sys, time, pathlib
    from distill_bench.energy import run_stage
    out, mode = sys.argv[1], sys.argv[2]
    def work(meter):
        meter.add_tokens("generated_tokens", 10)
        if mode == "burn":
            pathlib.Path(out + ".started").write_text("1")
            while True:
                sum(range(10**5))
    run_stage(stage="demo", stage_id="killed", role="teacher", out_json=out,
              settings={"codecarbon": False, "sample_interval_s": 0.05, "ledger_interval_s": 0.5}, fn=work)
""")


def test_sigkilled_attempt_keeps_its_seconds_and_joules(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(SIGKILL_STAGE)
    out = tmp_path / "energy" / "killed.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.Popen([sys.executable, str(script), str(out), "burn"], env=env)
    wait_for(lambda: Path(str(out) + ".started").exists(), what="stage to start")
    time.sleep(3.0)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    out.unlink()   # Snakemake deletes a failed job's outputs; the ledger remains
    assert subprocess.run([sys.executable, str(script), str(out), "quick"], env=env).returncode == 0
    rec = load_stage_json(out)
    shown = json.dumps(rec["attempts"], indent=1)
    killed, done = rec["attempts"]
    assert killed["status"] == "interrupted" and "died without a final write" in killed["error"], shown
    assert killed["duration_s"] >= 2.0, shown     # at most ledger_interval_s (+ a tick) lost of ~3 s
    assert killed["energy"]["cpu_j"] > 0, shown
    assert done["status"] == "complete" and rec["status"] == "complete", shown
    assert rec["duration_s"] == pytest.approx(killed["duration_s"] + done["duration_s"]), shown
    assert ledger_path_for(out).exists()


def _complete_record(tmp_path, accepted):
    kw = dict(stage="demo", stage_id="sig", role="eval", out_json=tmp_path / "sig.json", settings=NO_CC, devices="",
              rapl_root=tmp_path / "none")
    with StageMeter(**kw):
        time.sleep(0.2)
    first = load_stage_json(tmp_path / "sig.json")
    (tmp_path / "sig.json").unlink()     # Snakemake removes an incomplete job's outputs before rerunning it
    seen = []
    with StageMeter(**kw, output_accepted=lambda rec: seen.append(rec["end_time"]) or accepted):
        pass
    assert seen == [first["end_time"]]
    return load_stage_json(tmp_path / "sig.json")


def test_finished_attempt_whose_output_was_never_accepted_stays_on_the_bill(tmp_path):
    rec = _complete_record(tmp_path, accepted=False)
    first, second = rec["attempts"]
    assert first["status"] == "complete" and "never accepted" in first["discarded"]
    assert "discarded" not in second and rec["status"] == "complete"
    assert rec["duration_s"] == pytest.approx(first["duration_s"] + second["duration_s"])
    assert first["duration_s"] >= 0.2


@pytest.mark.parametrize("accepted", [True, None])
def test_accepted_or_unknown_complete_record_is_replaced_by_a_rerun(tmp_path, accepted):
    assert len(_complete_record(tmp_path, accepted=accepted)["attempts"]) == 1


def test_snakemake_metadata_tells_an_accepted_output_from_one_finished_after_it(tmp_path):
    """Reads the metadata a real Snakemake run records (the rerun-after-SIGINT case is a record newer than it)."""
    from distill_bench.stages import snakemake_output_accepted

    (tmp_path / "Snakefile").write_text('rule a:\n    output: "res/a.json"\n    shell: "echo {{}} > {output}"\n')
    subprocess.run([sys.executable, "-m", "snakemake", "-c1", "-d", str(tmp_path), "-s", str(tmp_path / "Snakefile")],
                   check=True, capture_output=True, timeout=300)
    accepted = snakemake_output_accepted("res/a.json", tmp_path / ".snakemake")
    mtime = (tmp_path / "res" / "a.json").stat().st_mtime

    def iso(t):
        import datetime as dt
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")

    assert accepted({"end_time": iso(mtime - 0.05)}) is True          # the record that Snakemake accepted
    assert accepted({"end_time": iso(mtime + 30)}) is False           # finished later, never accepted
    assert snakemake_output_accepted("res/b.json", tmp_path / ".snakemake")({"end_time": iso(mtime)}) is False
    assert snakemake_output_accepted("res/a.json", tmp_path / "nowhere")({"end_time": iso(mtime)}) is None


# ---------------------------------------------------------------------------------------------------- workflow
def snakemake_dry_run(tmp_path, gpus, *extra, config=REPO / "tests" / "configs" / "tiny.yaml", env=None):
    env = {**fake_env(tmp_path, gpus), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d",
                           str(tmp_path / "run"), "--configfile", str(config), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def rule_blocks(stdout):
    import re

    blocks = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", stdout):
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        if head:
            blocks.setdefault(head.group(1), block)
    return blocks


def test_gpu_rules_declare_a_gpu_on_a_gpu_machine_and_nothing_changes_without_one(tmp_path):
    with_gpu = rule_blocks(snakemake_dry_run(tmp_path, "GPU-fake-0,GPU-fake-1").stdout)
    for rule in ("train_student", "cache_logits", "generate_synthetic", "evaluate", "prepare_teacher"):
        assert "gpu=1" in with_gpu[rule], rule
    assert "gpu=2" in with_gpu["idle_baseline"] and "gpu=2" in with_gpu["prerun"]   # node checks lease all
    for rule in ("prepare_data", "prepare_tokenizer", "init_student", "merge_synthetic"):
        assert "gpu=" not in with_gpu[rule], rule
    without = rule_blocks(snakemake_dry_run(tmp_path, "").stdout)
    assert not any("gpu=" in block for block in without.values())
    # CUDA_VISIBLE_DEVICES narrows what the workflow counts
    one_of_two = rule_blocks(snakemake_dry_run(tmp_path, "GPU-fake-0,GPU-fake-1",
                                               env={"CUDA_VISIBLE_DEVICES": "1"}).stdout)
    assert "gpu=1" in one_of_two["idle_baseline"] and "gpu=1" in one_of_two["train_student"]


def test_exclusive_gpus_false_drops_the_cap_and_the_leases_on_a_gpu_machine(tmp_path):
    settings = tmp_path / "shared.yaml"
    settings.write_text("energy: {exclusive_gpus: false, accept_shared_devices: true}\n")
    proc = snakemake_dry_run(tmp_path, "GPU-fake-0", "--configfile", str(REPO / "tests" / "configs" / "tiny.yaml"),
                             str(settings))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    blocks = rule_blocks(proc.stdout)
    assert {"train_student", "evaluate", "idle_baseline"} <= set(blocks)
    assert not any("gpu=" in block for block in blocks.values())     # no job leases a device, none is capped


def test_a_rule_asking_for_more_gpus_than_visible_is_a_planning_error(tmp_path):
    import yaml

    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["training"]["gpus"] = 2
    path = tmp_path / "two_gpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake_dry_run(tmp_path, "GPU-fake-0", config=path)
    assert proc.returncode != 0
    assert "rule 'train_student' asks for 2 GPU(s) per job but this machine shows 1" in proc.stdout + proc.stderr
    cfg["training"]["gpus"] = 1
    cfg["resources"] = {"rules": {"evaluate": {"gpu": 3}}}
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake_dry_run(tmp_path, "GPU-fake-0,GPU-fake-1", config=path)
    assert proc.returncode != 0 and "rule 'evaluate' asks for 3 GPU(s)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_local_run_on_one_gpu_runs_gpu_stages_one_at_a_time_on_their_lease(tmp_path):
    """The tiny config up to synthetic generation on a (fake) one-GPU machine with 2 cores: the scheduler runs the
    GPU stages one at a time (so none waits on a lock), each records its lease, none saw another on its device, and
    CPU stages neither lease nor meter the GPU."""
    env = {**fake_env(tmp_path, "GPU-fake-0"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    (tmp_path / "nvml").mkdir()
    settings = tmp_path / "lease.yaml"
    settings.write_text(f"energy: {{lock_dir: {tmp_path / 'locks'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-c2", "-s", str(REPO / "Snakefile"), "-d",
                           str(tmp_path / "run"), "--configfile", str(REPO / "tests" / "configs" / "tiny.yaml"),
                           str(settings), "--until", "generate_synthetic"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'gpu=Resource("gpu", 1)' in proc.stdout + proc.stderr        # the global cap: one visible GPU
    energy = tmp_path / "run" / "results" / "energy"
    records = [load_stage_json(p) for p in energy.glob("*.json") if p.name != "idle.json"]
    gpu_stages = [r for r in records if r["stage"] in ("prepare_teacher", "generate_synthetic")]
    assert len(gpu_stages) == 3
    windows = []
    for rec in gpu_stages:
        assert rec["lease"]["devices"] == [{"index": 0, "uuid": "GPU-fake-0"}]
        assert rec["lease"]["lock_dir"] == str(tmp_path / "locks")
        assert rec["lease"]["waited_s"] < 1.0, "serialised by a lock wait, not by the scheduler"
        assert rec["sharing"]["checked"] is True and rec["sharing"]["shared"] is False
        assert rec["energy"]["sources"]["gpu"] == "measured:nvml_energy_counter"
        windows.append((rec["start_time"], rec["end_time"]))
    windows.sort()
    assert all(later[0] >= earlier[1] for earlier, later in zip(windows, windows[1:])), windows
    for rec in records:
        if rec["stage"] in ("prepare_data", "prepare_tokenizer"):
            assert rec["lease"] is None and rec["energy"]["sources"]["gpu"] == "unavailable"


def test_measure_cli_leases_gpus_and_runs_the_command_on_them(tmp_path):
    out = tmp_path / "m.json"
    env = fake_env(tmp_path, "GPU-fake-0,GPU-fake-1")
    held = acquire(1, lock_dir=tmp_path / "locks", devices=TWO[:1])       # device 0 is taken
    child = "import os; print('CVD=' + os.environ['CUDA_VISIBLE_DEVICES'])"
    proc = subprocess.run([sys.executable, "-m", "distill_bench", "measure", "--stage", "m", "--out", str(out),
                           "--no-codecarbon", "--gpus", "1", "--lock-dir", str(tmp_path / "locks"), "--",
                           sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    held.release()
    assert proc.returncode == 0, proc.stderr
    assert "CVD=1" in proc.stdout
    rec = load_stage_json(out)
    assert rec["lease"]["devices"] == [{"index": 1, "uuid": "GPU-fake-1"}]
    assert list(rec["energy"]["per_device_j"]) == ["gpu1"]
    too_many = subprocess.run([sys.executable, "-m", "distill_bench", "measure", "--stage", "m", "--out", str(out),
                               "--gpus", "3", "--lock-dir", str(tmp_path / "locks"), "--", "true"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert too_many.returncode == 2 and "asks for 3 GPU(s) but only 2 are visible" in too_many.stderr


def test_shared_device_gets_a_labelled_utilisation_estimate_beside_the_counter(tmp_path):
    from test_energy import fake_gpus

    nv = fake_gpus(1)
    me, other = os.getpid(), os.getppid()
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [type("P", (), {"pid": p})() for p in (me, other)]
    stamp = iter(range(1, 10**6))

    def utilisation(h, since):
        t = next(stamp)
        return [type("S", (), {"pid": me, "smUtil": 30, "timeStamp": t})(),
                type("S", (), {"pid": other, "smUtil": 90, "timeStamp": t})()]

    nv.nvmlDeviceGetProcessUtilization = utilisation
    with StageMeter(stage="demo", stage_id="u", role="eval", out_json=tmp_path / "u.json", settings=NO_CC,
                    nvml_module=nv, rapl_root=tmp_path / "none"):
        time.sleep(1.3)
        nv.devs[0]["energy_mj"] += 100_000
    rec = load_stage_json(tmp_path / "u.json")
    assert rec["energy"]["gpu_j"] == 100.0     # the billed figure stays the device counter, labelled shared
    assert rec["energy"]["sources"]["gpu"] == "measured:nvml_energy_counter+shared_device"
    att = rec["attempts"][0]["sharing"]["attribution"]
    assert att["source"] == "estimated:per_process_utilisation"
    assert att["per_device"]["gpu0"]["our_share"] == pytest.approx(0.25)
    assert att["gpu_j"] == pytest.approx(25.0)
