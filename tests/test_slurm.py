"""SLURM: a real single-node SLURM run of a tiny config, the sbatch resources a cluster config plans, partition
overreach refused at planning time, hardware presets, and the prerun hardware check (fake NVML).

The real-SLURM test needs a running controller (`ci/slurm/start_slurm.sh`, as root; `.ci/run` starts it) and is
skipped, saying why, where `sinfo` does not answer. Everything else runs anywhere: a dry run needs no SLURM.
Run `pytest -s tests/test_slurm.py` to see the per-rule resource table and sbatch lines.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from distill_bench import hardware
from distill_bench.hardware import HardwareError

ROOT = Path(__file__).resolve().parents[1]
TINY_SLURM = ROOT / "tests" / "configs" / "tiny_slurm.yaml"
CLUSTER = ROOT / "configs" / "olmo2_cluster.yaml"
PARTITIONS = ROOT / "profiles" / "slurm" / "partitions.yaml"
PROFILE = ROOT / "profiles" / "slurm"
LOCALRULES = {"config_snapshot", "environment_snapshot", "rollup"}
GPU_RESOURCE_KEYS = ("gpu", "gpu_model", "mem_mb", "runtime", "cpus_per_task")


def snakemake(*args: str, cwd: Path, check: bool = True, timeout: int = 1200,
              env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(cwd), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def slurm_unavailable() -> str | None:
    """Why the real-SLURM test cannot run here (None when a controller answers with a usable node)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools not installed (run ci/slurm/start_slurm.sh as root to set up a single-node SLURM)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller answering (run ci/slurm/start_slurm.sh)"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()[:200]}): no SLURM controller (run ci/slurm/start_slurm.sh)"
    states = {s.strip().rstrip("*~#") for s in out.stdout.split()}
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return f"no usable SLURM node (states: {sorted(states) or 'none'})"
    return None


# ---------------------------------------------------------------------------------------------- dry-run parsing
def planned_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) for every job of a dry run's output (local rules are prefixed ``local:`` in a real run)."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        head = re.match(r"(local)?rule (\w+):", block.strip())
        if not head:
            continue
        res: dict[str, str] = {}
        found = re.search(r"^\s*resources: (.*)$", block, re.M)
        if found:
            for item in found.group(1).split(", "):
                key, _, value = item.partition("=")
                res[key.strip()] = value.strip()
        jobs.append((("local:" if head.group(1) else "") + head.group(2), res))
    return jobs


class _Resources(dict):
    """dict with attribute access: what the plugin's helpers expect of ``job.resources``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _typed(value: str):
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def sbatch_call(rule: str, res: dict[str, str]) -> str:
    """The sbatch call the SLURM plugin builds for a job with these resources (its own helpers, no submission)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    resources = _Resources({k: _typed(v) for k, v in res.items()})
    job = SimpleNamespace(resources=resources, threads=int(resources.get("_cores", 1)), name=rule)
    partition = f" -p {resources['slurm_partition']}" if resources.get("slurm_partition") else ""
    account = f" -A {resources['slurm_account']}" if resources.get("slurm_account") else ""
    params = {"run_uuid": "RUN", "slurm_logfile": f".snakemake/slurm_logs/rule_{rule}/%j.log",
              "comment_str": f"rule_{rule}", "account": account, "partition": partition, "workdir": "."}
    settings = SimpleNamespace(requeue=True, no_requeue=False, qos=None, reservation=None)
    return get_submit_command(job, params, settings=settings) + set_gres_string(job)


def forbidden_in_slurm_extra(res: dict[str, str]) -> list[str]:
    from snakemake_executor_plugin_slurm.validation import get_forbidden_slurm_options

    extra = res.get("slurm_extra", "")
    return [name for pattern, name in get_forbidden_slurm_options().items() if extra and re.search(pattern, extra)]


# ------------------------------------------------------------------------------------------------ must-show 4
def test_cluster_dry_run_shows_sbatch_resources_for_every_gpu_rule(tmp_path):
    proc = snakemake("-n", "--profile", str(PROFILE), "--configfile", str(CLUSTER), cwd=tmp_path)
    jobs = planned_resources(proc.stdout)
    assert jobs, proc.stdout[-3000:]
    per_rule: dict[str, dict[str, str]] = {}
    for rule, res in jobs:
        assert not forbidden_in_slurm_extra(res), f"{rule}: slurm_extra carries {forbidden_in_slurm_extra(res)}"
        prev = per_rule.setdefault(rule, res)
        assert {k: prev.get(k) for k in GPU_RESOURCE_KEYS} == {k: res.get(k) for k in GPU_RESOURCE_KEYS}, \
            f"{rule}: jobs of one rule ask for different resources"
    gpu_rules = {r: res for r, res in per_rule.items() if int(res.get("gpu", 0) or 0) > 0}
    assert {"cache_logits", "generate_synthetic", "train_student", "evaluate"} <= set(gpu_rules)
    # (a dry run prints local rules as "rule" too; the real-SLURM test checks they never reach sbatch)
    assert not LOCALRULES & set(gpu_rules)

    rows = []
    for rule, res in sorted(gpu_rules.items()):
        call = sbatch_call(rule, res)
        rows.append({"rule": rule, **{k: res.get(k) for k in GPU_RESOURCE_KEYS},
                     "sbatch": " ".join(re.findall(r"--gpus=\S+|--mem \d+|-t \S+|--cpus-per-\w+=\d+|-p \S+|-A \S+",
                                                   call))})
        for key in GPU_RESOURCE_KEYS:
            assert res.get(key) not in (None, ""), f"{rule}: no {key} in the dry run's resources"
        assert f"--gpus={res['gpu_model']}:{res['gpu']}" in call
        assert f"--mem {res['mem_mb']}" in call and f"-t {res['runtime']}" in call
        assert f"--cpus-per-task={res['cpus_per_task']}" in call
        assert "--gres" not in call, "GPUs go through --gpus (gpu/gpu_model), never a second GRES request"
    table = pd.DataFrame(rows).to_string(index=False)
    print(f"\nsbatch resources per GPU rule (configs/olmo2_cluster.yaml, profiles/slurm):\n{table}")
    train = gpu_rules["train_student"]
    assert (train["gpu"], train["gpu_model"], train["mem_mb"], train["runtime"], train["cpus_per_task"]) == \
        ("1", "h100", "128000", "1440", "16")


def test_forbidden_slurm_extra_is_detected_by_the_plugins_own_rules():
    """The check above would catch a forbidden flag (a dry run itself does not)."""
    assert forbidden_in_slurm_extra({"slurm_extra": "--gres=gpu:2 --qos=high"})
    assert forbidden_in_slurm_extra({"slurm_extra": "--mem=4G"})
    assert not forbidden_in_slurm_extra({"slurm_extra": "--mail-type=END"})


# ---------------------------------------------------------------------------------------- partition overreach
def _cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_rule_asking_more_gpus_than_its_model_offers_is_a_planning_error(tmp_path):
    cfg = _cluster_cfg()
    cfg["resources"]["rules"]["train_student"] = {"gpu": 16, "gpu_model": "h100", "cpus": 16, "mem_mb": 128000,
                                                  "runtime": 1440}
    cfg["hardware"] = {"partitions_file": str(PARTITIONS)}
    bad = tmp_path / "overreach.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--profile", str(PROFILE), "--configfile", str(bad), cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "resources.rules.train_student" in out and "16" in out
    assert "at most 8 'h100' GPUs" in out
    assert "Job stats" not in out and not any(tmp_path.glob("results*"))


def test_partition_check_names_rule_model_and_each_partitions_reason():
    cfg = {"resources": {"default": {"cpus": 4, "mem_mb": 16000, "runtime": 60},
                         "rules": {"evaluate": {"gpu": 2, "gpu_model": "a100"}}}}
    with pytest.raises(HardwareError) as err:
        hardware.check_partitions(cfg, PARTITIONS)
    msg = str(err.value)
    assert "resources.rules.evaluate" in msg and "gpu_model=a100" in msg
    assert "h100: offers GPU models ['h100'], not 'a100'" in msg and "cpu: offers at most 0" in msg
    cfg["resources"]["rules"]["evaluate"] = {"gpu": 4, "gpu_model": "l40s"}
    assert hardware.check_partitions(cfg, PARTITIONS) == {"default": "h100,l40s,cpu", "evaluate": "l40s"}
    cfg["resources"]["rules"]["evaluate"] = {"gres": "gpu:l40s:5"}
    with pytest.raises(HardwareError, match="at most 4 'l40s' GPUs per job, rule asks for 5"):
        hardware.check_partitions(cfg, PARTITIONS)


def test_partition_check_refuses_runtime_memory_and_unknown_partition():
    base = {"default": {"cpus": 4, "mem_mb": 16000, "runtime": 60}}
    with pytest.raises(HardwareError, match="train_student.*runtime"):
        hardware.check_partitions({"resources": {**base, "rules": {"train_student": {
            "gpu": 1, "gpu_model": "h100", "runtime": 5000}}}}, PARTITIONS)
    with pytest.raises(HardwareError, match="slurm_partition 'gpu-big' is not in"):
        hardware.check_partitions({"resources": {**base, "rules": {"evaluate": {
            "gpu": 1, "slurm_partition": "gpu-big"}}}}, PARTITIONS)
    with pytest.raises(HardwareError, match="cpu: allows 250000 MB"):
        hardware.check_partitions({"resources": {**base, "rules": {"prepare_data": {
            "mem_mb": 300000, "slurm_partition": "cpu"}}}}, PARTITIONS)


def test_bad_partitions_file_is_named(tmp_path):
    with pytest.raises(HardwareError, match="does not exist"):
        hardware.read_partitions(tmp_path / "nope.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("partitions: {gpu: {max_gpus: 4}}\n")
    with pytest.raises(HardwareError, match=r"partitions.gpu: unknown key\(s\) \['max_gpus'\]"):
        hardware.read_partitions(typo)
    (tmp_path / "empty.yaml").write_text("partitions: {}\n")
    with pytest.raises(HardwareError, match="non-empty 'partitions:'"):
        hardware.read_partitions(tmp_path / "empty.yaml")
    (tmp_path / "time.yaml").write_text("partitions: {gpu: {max_runtime: '1-12:00:00', max_gpu: 1}}\n")
    assert hardware.read_partitions(tmp_path / "time.yaml")["gpu"]["max_runtime"] == 36 * 60


def test_example_partitions_file_is_accepted_by_the_slurm_plugin_too():
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    names = {p.name: p.limits for p in read_partition_file(PARTITIONS)}
    assert names.keys() == hardware.read_partitions(PARTITIONS).keys()
    assert names["h100"].max_gpu == 8 and names["h100"].available_gpu_models == ["h100"]


# --------------------------------------------------------------------------------------------------- presets
def test_presets_give_gpu_rules_their_gpu_and_keep_the_configs_own_resources():
    cfg = {"hardware": {"preset": "l40s"},
           "resources": {"default": {"mem_mb": 2000, "gpu": 0},
                         "rules": {"train_student": {"runtime": 30}}}}
    out = hardware.apply_preset(cfg)
    train = hardware.rule_resources(out, "train_student")
    assert train == {"gpu": 1, "gpu_model": "l40s", "cpus": 8, "mem_mb": 64000, "runtime": 30}
    data = hardware.rule_resources(out, "prepare_data")
    assert data == {"gpu": 0, "cpus": 4, "mem_mb": 2000, "runtime": 60}  # config default beats preset default
    assert hardware.rule_resources(hardware.apply_preset({"hardware": {"preset": "h100"}}), "evaluate")["gpu_model"] \
        == "h100"
    assert not any(r.get("gpu") for r in hardware.apply_preset({"hardware": {"preset": "cpu"}})["resources"]
                   ["rules"].values())
    assert hardware.apply_preset({"resources": {"default": {}}}) == {"resources": {"default": {}}}
    with pytest.raises(HardwareError, match="hardware.preset: unknown preset 'a100'"):
        hardware.apply_preset({"hardware": {"preset": "a100"}})


def test_every_preset_fits_the_example_partitions():
    for preset, partition in (("h100", "h100"), ("l40s", "l40s")):
        fits = hardware.check_partitions(hardware.apply_preset({"hardware": {"preset": preset}}), PARTITIONS)
        assert fits["train_student"] == partition and fits["cache_logits"] == partition


# ---------------------------------------------------------------------------------------------------- prerun
@pytest.fixture
def fake_nvml():
    from test_energy import FakeNvml

    class CappedNvml(FakeNvml):
        """FakeNvml plus the power-limit, memory and driver queries prerun reads."""

        def __init__(self, devices, enforced_w=700.0, name=b"NVIDIA H100 80GB HBM3", mem_gb=85.0):
            super().__init__(devices)
            self.enforced_w, self.name, self.mem_gb = enforced_w, name, mem_gb
            self.set_calls = []

        def nvmlDeviceGetName(self, h):
            return self.name

        def nvmlDeviceGetMemoryInfo(self, h):
            return type("M", (), {"used": 2**30, "total": int(self.mem_gb * 1e9)})()

        def nvmlDeviceGetEnforcedPowerLimit(self, h):
            return int(self.enforced_w * 1000)

        def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
            return 700_000

        def nvmlDeviceSetPowerManagementLimit(self, h, mw):  # must never be called
            self.set_calls.append(mw)

        def nvmlSystemGetDriverVersion(self):
            return b"570.00"

    def make(n=1, **kw):
        return CappedNvml([{"uuid": f"GPU-{i}"} for i in range(n)], **kw)

    return make


def test_prerun_passes_on_matching_h100_with_enforced_cap_and_never_sets_it(tmp_path, fake_nvml, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nv = fake_nvml(2, enforced_w=500.0)
    burns = []
    rec = hardware.prerun(out_json=tmp_path / "prerun.json", hardware={"preset": "h100", "power_cap_w": 500,
                                                                         "burn_in_s": 3},
                          energy={"policy": "measured"}, nvml_module=nv,
                          burn_in_fn=lambda s: burns.append(s) or {"seconds": s})
    assert rec["status"] == "ok" and not rec["problems"]
    assert [g["enforced_power_limit_w"] for g in rec["gpus"]] == [500.0, 500.0]
    assert burns == [3.0] and rec["burn_in"]["seconds"] == 3.0 and set(rec["burn_in"]["after"]) == {"gpu0", "gpu1"}
    assert nv.set_calls == []
    assert json.loads((tmp_path / "prerun.json").read_text())["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"


def test_prerun_refuses_wrong_power_limit_model_and_memory_naming_the_fix(tmp_path, fake_nvml, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(HardwareError) as err:
        hardware.prerun(out_json=tmp_path / "p.json", hardware={"preset": "h100", "power_cap_w": 400},
                        nvml_module=fake_nvml(1, enforced_w=700.0))
    assert "enforced power limit is 700 W, hardware.power_cap_w is 400 W" in str(err.value)
    assert "nvidia-smi -i 0 -pl 400" in str(err.value)
    assert json.loads((tmp_path / "p.json").read_text())["status"] == "mismatch"
    with pytest.raises(HardwareError, match="does not contain 'L40S'"):
        hardware.prerun(out_json=tmp_path / "p.json", hardware={"preset": "l40s"}, nvml_module=fake_nvml(1))
    with pytest.raises(HardwareError, match="40.0 GB of memory, expected at least 80 GB"):
        hardware.prerun(out_json=tmp_path / "p.json", hardware={"preset": "h100"},
                        nvml_module=fake_nvml(1, mem_gb=40.0))
    burns = []
    with pytest.raises(HardwareError):
        hardware.prerun(out_json=tmp_path / "p.json", hardware={"preset": "h100", "power_cap_w": 1, "burn_in_s": 5},
                        nvml_module=fake_nvml(1), burn_in_fn=burns.append)
    assert burns == [], "no burn-in on a node that failed the check"


def test_prerun_on_cpu_only_node_records_facts_and_passes_without_preset(tmp_path, fake_nvml):
    rec = hardware.prerun(out_json=tmp_path / "p.json", hardware={"burn_in_s": 2}, nvml_module=fake_nvml(0))
    assert rec["status"] == "ok" and rec["gpus"] == [] and rec["burn_in"]["skipped"]
    assert rec["cpus_available"] >= 1
    with pytest.raises(HardwareError, match="expected H100 but NVML sees no GPU"):
        hardware.prerun(out_json=tmp_path / "p.json", hardware={"preset": "h100"}, nvml_module=fake_nvml(0))
    assert hardware.prerun(out_json=tmp_path / "c.json", hardware={"preset": "cpu"},
                           nvml_module=fake_nvml(0))["status"] == "ok"


# ------------------------------------------------------------------------------------------------ must-show 1
@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_config_runs_through_real_slurm_to_the_comparison_table(tmp_path):
    why = slurm_unavailable()
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    snakemake("--profile", str(PROFILE), "--configfile", str(TINY_SLURM),
              "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs", cwd=tmp_path)
    elapsed = time.monotonic() - t0
    table = pd.read_csv(tmp_path / "results" / "summary" / "comparison.csv")
    assert set(table.pipeline) == {"sft_gt", "kd", "sft"}
    assert (table.trained_tokens == 1500).all()

    log = "\n".join(p.read_text() for p in sorted((tmp_path / ".snakemake" / "log").glob("*.snakemake.log")))
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", log)
    by_rule: dict[str, list[str]] = {}
    for jobid, path in submitted:
        rule = re.search(r"/rule_(\w+)/", path).group(1)
        by_rule.setdefault(rule, []).append(jobid)
        assert Path(path).is_file(), f"SLURM log of job {jobid} missing"
    assert {"prepare_data", "prepare_tokenizer", "prepare_teacher", "idle_baseline", "init_student", "cache_logits",
            "generate_synthetic", "merge_synthetic", "train_student", "evaluate"} <= set(by_rule)
    assert len(by_rule["train_student"]) == 3 and len(by_rule["generate_synthetic"]) == 2
    assert not LOCALRULES & set(by_rule), "local rules must run on the submit host"
    slurm_logs = tmp_path / ".snakemake" / "slurm_logs"
    assert not any((slurm_logs / f"rule_{r}").exists() for r in LOCALRULES)
    for rule in LOCALRULES:
        assert re.search(rf"localrule {rule}:", log)
    # the scheduler itself saw every job finish (MinJobAge keeps them in squeue without accounting)
    ids = [j for js in by_rule.values() for j in js]
    sq = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T", "--jobs", ",".join(ids)],
                        capture_output=True, text=True)
    states = dict(line.split("|") for line in sq.stdout.split())
    assert set(states) == set(ids) and set(states.values()) == {"COMPLETED"}, states
    # the stages ran inside SLURM allocations, as the submitting user's environment (sbatch --export=ALL)
    train_log = next((slurm_logs / "rule_train_student").rglob("*.log")).read_text()
    assert "--executor slurm-jobstep" in train_log and "Finished jobid" in train_log
    print(f"\nreal SLURM run of tests/configs/tiny_slurm.yaml: {len(ids)} SLURM jobs, "
          f"{len(LOCALRULES)} local rules, {elapsed:.0f} s wall")
