"""Hardware regimes: presets of per-rule SLURM resources, a planning-time partition check, and the prerun check.

Three concerns, all cheap at import (no torch; torch only inside the optional burn-in):

* :func:`apply_preset` turns ``hardware.preset`` (``h100``, ``l40s``, ``cpu``) into default resources per rule, so a
  user picks a partition type instead of writing a resource table. The config's own ``resources`` always win.
* :func:`check_partitions` refuses at planning time a rule whose resources no partition of
  ``hardware.partitions_file`` can hold (more GPUs of a model than a partition offers, too much memory or runtime).
  The SLURM executor plugin reads the same file (``--slurm-partition-config``) but only at submission, and then
  merely warns and submits anyway; a wrong request should fail before a 27-experiment grid is queued.
* :func:`prerun` (rule ``prerun``) asserts that the node the stages run on matches the preset -- GPU model, memory,
  and the *enforced* power limit when ``hardware.power_cap_w`` is set -- optionally burns the GPUs in so later
  stages start thermally stable, and writes the facts to a JSON. It reads card settings and never changes them:
  applying a power cap is the user's own opt-in step (``nvidia-smi -pl``, see docs/SLURM.md).
"""
from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

# ---------------------------------------------------------------------------------------------------- presets
# Rules that get a GPU on GPU partitions: the teacher-side stages, training, evaluation and the node checks (prerun,
# idle baseline) which must run on the same kind of node as the stages they describe.
GPU_RULES = ("prerun", "idle_baseline", "prepare_teacher", "cache_logits", "cache_tail", "generate_synthetic",
             "train_student", "evaluate")
# a rule without its own resources.rules entry takes this rule's: the KD tail is the cache's teacher pass again
RESOURCES_LIKE = {"cache_tail": "cache_logits"}

# One GPU per job. CPU and memory are the GPU's share of a typical node: 8x H100 80GB with 2x56 cores and 2 TB,
# 4-8x L40S 48GB with 2x32 cores and 512 GB-1 TB. Runtimes are minutes for the first attempt (the profile's retry
# multiplies them by the attempt number).
PRESETS: dict[str, dict[str, Any]] = {
    "h100": {
        "gpu_model": "h100", "gpu_name": "H100", "gpu_memory_gb": 80,
        "default": {"gpu": 0, "cpus": 4, "mem_mb": 16000, "runtime": 60},
        "gpu_rule": {"gpu": 1, "gpu_model": "h100", "cpus": 16, "mem_mb": 128000},
        "runtime": {"prerun": 20, "idle_baseline": 15, "prepare_teacher": 240, "cache_logits": 1440,
                    "cache_tail": 1440, "generate_synthetic": 1440, "train_student": 1440, "evaluate": 240},
    },
    "l40s": {
        "gpu_model": "l40s", "gpu_name": "L40S", "gpu_memory_gb": 48,
        "default": {"gpu": 0, "cpus": 4, "mem_mb": 16000, "runtime": 60},
        "gpu_rule": {"gpu": 1, "gpu_model": "l40s", "cpus": 8, "mem_mb": 64000},
        # L40S: about a third of H100's bf16 throughput and half its memory bandwidth -> longer limits
        "runtime": {"prerun": 20, "idle_baseline": 15, "prepare_teacher": 360, "cache_logits": 2880,
                    "cache_tail": 2880, "generate_synthetic": 2880, "train_student": 2880, "evaluate": 480},
    },
    "cpu": {
        "gpu_model": None, "gpu_name": None, "gpu_memory_gb": None,
        "default": {"gpu": 0, "cpus": 2, "mem_mb": 4000, "runtime": 120},
        "gpu_rule": {"gpu": 0},
        "runtime": {},
    },
}

RESOURCE_KEYS = ("mem_mb", "runtime", "cpus", "gpu", "gpu_model", "gres", "cpus_per_gpu", "slurm_partition",
                 "slurm_account", "nodes")


class HardwareError(ValueError):
    """The configured hardware regime cannot be honoured (bad preset, partition overreach, node mismatch)."""


def preset_resources(preset: str) -> dict[str, Any]:
    """``{"default": {...}, "rules": {rule: {...}}}`` for a preset, in the config's ``resources`` format."""
    if preset not in PRESETS:
        raise HardwareError(f"hardware.preset: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    p = PRESETS[preset]
    rules = {}
    if p["gpu_rule"].get("gpu"):
        for rule in GPU_RULES:
            rules[rule] = {**p["gpu_rule"], "runtime": p["runtime"][rule]}
    return {"default": dict(p["default"]), "rules": rules}


def apply_preset(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Config with ``hardware.preset``'s resources filled in under its own ``resources``.

    Precedence (lowest first): preset default < config ``resources.default`` < preset per-rule < config
    ``resources.rules.<rule>``. A config default such as ``gpu: 0`` therefore does not take the GPU away from the
    preset's GPU rules, while anything the user wrote for one rule is kept.
    """
    cfg = dict(cfg)
    hw = dict(cfg.get("hardware") or {})
    preset = hw.get("preset")
    if preset is None:
        return cfg
    base = preset_resources(preset)
    own = cfg.get("resources") or {}
    own_rules = own.get("rules") or {}
    rules = {name: {**base["rules"].get(name, {}), **own_rules.get(name, {})}
             for name in sorted(set(base["rules"]) | set(own_rules))}
    cfg["resources"] = {**own, "default": {**base["default"], **(own.get("default") or {})}, "rules": rules}
    return cfg


def rule_resources(cfg: Mapping[str, Any], rule: str) -> dict[str, Any]:
    """The resources one rule gets: ``resources.default`` overlaid with ``resources.rules.<rule>``."""
    res = cfg.get("resources") or {}
    rules = res.get("rules") or {}
    own = rules.get(rule) or rules.get(RESOURCES_LIKE.get(rule, "")) or {}
    return {**(res.get("default") or {}), **own}


def expected_hardware(hw: Mapping[str, Any]) -> dict[str, Any]:
    """What prerun must find: explicit ``expect_*`` keys, else the preset's GPU name and memory."""
    preset = hw.get("preset")
    p = PRESETS.get(preset, {}) if preset else {}
    if preset and preset not in PRESETS:
        raise HardwareError(f"hardware.preset: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    return {
        "gpu_model": hw.get("expect_gpu_model") or p.get("gpu_name"),
        "gpu_memory_gb": hw.get("expect_gpu_memory_gb") or p.get("gpu_memory_gb"),
        "needs_gpu": bool(p.get("gpu_rule", {}).get("gpu")) or bool(hw.get("expect_gpu_model")),
        "power_cap_w": hw.get("power_cap_w"),
    }


# ------------------------------------------------------------------------------------------- partition check
PARTITION_KEYS = {"max_runtime", "max_mem_mb", "max_mem_mb_per_cpu", "max_cpus_per_task", "max_threads", "max_nodes",
                  "max_tasks", "max_tasks_per_node", "max_gpu", "available_gpu_models", "max_cpus_per_gpu",
                  "supports_mpi", "max_mpi_tasks", "available_constraints", "slurm_cluster", "cluster", "clusters"}


def _minutes(value: Any, where: str) -> float:
    """Partition runtime limit -> minutes (number = minutes, or SLURM's [D-]HH:MM:SS / MM:SS, or 'infinite')."""
    if isinstance(value, bool):
        raise HardwareError(f"{where}: max_runtime must be minutes or a SLURM time string; got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    if text in ("infinite", "unlimited"):
        return math.inf
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        days = int(d)
    try:
        parts = [int(x) for x in text.split(":")]
    except ValueError:
        raise HardwareError(f"{where}: max_runtime {value!r} is not minutes or [D-]HH:MM:SS") from None
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    else:
        raise HardwareError(f"{where}: max_runtime {value!r} is not minutes or [D-]HH:MM:SS")
    return days * 1440 + h * 60 + m + s / 60


def read_partitions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Partition limits in the SLURM executor plugin's ``--slurm-partition-config`` format, validated."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HardwareError(f"hardware.partitions_file: {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise HardwareError(f"hardware.partitions_file: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("partitions"), dict) or not data["partitions"]:
        raise HardwareError(f"{path}: needs a non-empty 'partitions:' mapping (partition name -> limits)")
    out = {}
    for name, limits in data["partitions"].items():
        where = f"{path}: partitions.{name}"
        limits = limits or {}
        if not isinstance(limits, dict):
            raise HardwareError(f"{where} must be a mapping of limits")
        unknown = sorted(set(limits) - PARTITION_KEYS)
        if unknown:
            raise HardwareError(f"{where}: unknown key(s) {unknown}; known: {sorted(PARTITION_KEYS)}")
        lim = dict(limits)
        if "max_runtime" in lim:
            lim["max_runtime"] = _minutes(lim["max_runtime"], where)
        models = lim.get("available_gpu_models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise HardwareError(f"{where}.available_gpu_models must be a list of model names")
        out[str(name)] = lim
    return out


def _gpu_request(res: Mapping[str, Any], rule: str) -> tuple[int, str | None]:
    gpu = int(res.get("gpu") or 0)
    gres = str(res.get("gres") or "")
    if "gpu" in gres:
        if gpu:
            raise HardwareError(f"resources for rule {rule!r}: 'gpu' and a gpu 'gres' are mutually exclusive")
        spec = next(p for p in gres.split(",") if p.strip().startswith("gpu")).strip().split(":")
        if len(spec) == 3:
            return int(spec[2]), spec[1]
        return (int(spec[1]) if len(spec) == 2 else 1), None
    return gpu, (res.get("gpu_model") if gpu else None)


# Rules whose stage may put work on a GPU when one is visible. In a local run each of them declares the Snakemake
# resource `gpu` and leases its devices (distill_bench.energy.lease), so no two stages share a device's energy counter.
GPU_CAPABLE_RULES = GPU_RULES + ("sample_preferences", "judge_preferences", "precompute_reference")
# node checks describe every device (idle power per GPU), so locally they lease all visible GPUs
WHOLE_NODE_RULES = ("prerun", "idle_baseline")


def local_gpu_request(cfg: Mapping[str, Any], rule: str, visible: int, job_gpus: int | None = None) -> int:
    """GPUs one job of ``rule`` leases in a local run with ``visible`` GPUs (0 on a CPU-only machine).

    A GPU-capable rule gets what the config asks for, at least one; ``job_gpus`` is a job's own need (a multi-GPU
    training run). Asking for more than are visible is a planning error naming the rule: Snakemake would otherwise
    quietly cap the request at the visible count and the stage would run on fewer devices than configured.
    """
    if visible <= 0 or rule not in GPU_CAPABLE_RULES:
        return 0
    if rule in WHOLE_NODE_RULES:
        return visible
    configured, _ = _gpu_request(rule_resources(cfg, rule), rule)
    want = max(1, configured, int(job_gpus or 0))
    if want > visible:
        raise HardwareError(f"rule {rule!r} asks for {want} GPU(s) per job but this machine shows {visible} "
                            "(CUDA_VISIBLE_DEVICES / NVML); lower resources.rules." + rule + ".gpu or "
                            "training.gpus, or run on a machine with more GPUs")
    return want


def partition_misfit(res: Mapping[str, Any], lim: Mapping[str, Any], rule: str) -> str | None:
    """Why ``res`` cannot run on a partition with limits ``lim`` (None if it fits)."""
    n_gpu, model = _gpu_request(res, rule)
    if n_gpu:
        max_gpu = int(lim.get("max_gpu") or 0)
        models = lim.get("available_gpu_models")
        if model and models and model not in models:
            return f"offers GPU models {models}, not {model!r}"
        if n_gpu > max_gpu:
            what = f"{model!r} GPUs" if model else "GPUs"
            return f"offers at most {max_gpu} {what} per job, rule asks for {n_gpu}"
        per_gpu = res.get("cpus_per_gpu")
        if per_gpu and per_gpu > lim.get("max_cpus_per_gpu", math.inf):
            return f"allows {lim['max_cpus_per_gpu']} CPUs per GPU, rule asks for {per_gpu}"
    checks = (("mem_mb", "max_mem_mb", "MB of memory"), ("runtime", "max_runtime", "minutes of runtime"),
              ("nodes", "max_nodes", "nodes"))
    for key, limit_key, unit in checks:
        want = res.get(key)
        if want and want > lim.get(limit_key, math.inf):
            return f"allows {lim[limit_key]:g} {unit}, rule asks for {want}"
    cpus = res.get("cpus")
    for limit_key in ("max_cpus_per_task", "max_threads"):
        if cpus and cpus > lim.get(limit_key, math.inf):
            return f"allows {lim[limit_key]} CPUs per task ({limit_key}), rule asks for {cpus}"
    return None


def check_partitions(cfg: Mapping[str, Any], partitions_file: str | os.PathLike | None = None,
                     rules: Iterable[str] | None = None) -> dict[str, str]:
    """Planning-time check: every rule's resources fit some partition of the partitions file.

    ``partitions_file`` defaults to ``hardware.partitions_file``, else the ``SNAKEMAKE_SLURM_PARTITIONS``
    environment variable the SLURM plugin reads too (relative paths are taken from the current directory, i.e. where
    snakemake runs); none of them set -> nothing to check. ``rules`` defaults to every rule named under
    ``resources.rules`` plus ``default`` (which stands for all other rules). Returns rule -> the partitions it fits
    (comma-separated); raises :class:`HardwareError` naming the rule, what it asks for and why each partition refuses.
    """
    hw = cfg.get("hardware") or {}
    path = partitions_file or hw.get("partitions_file") or os.environ.get("SNAKEMAKE_SLURM_PARTITIONS")
    if not path:
        return {}
    partitions = read_partitions(path)
    res_cfg = cfg.get("resources") or {}
    names = list(rules) if rules is not None else ["default", *sorted((res_cfg.get("rules") or {}))]
    fits: dict[str, str] = {}
    for rule in names:
        res = dict(res_cfg.get("default") or {}) if rule == "default" else rule_resources(cfg, rule)
        label = "resources.default" if rule == "default" else f"resources.rules.{rule}"
        wanted = res.get("slurm_partition")
        if wanted is not None and wanted not in partitions:
            raise HardwareError(f"{label}: slurm_partition {wanted!r} is not in {path} "
                                f"(partitions: {', '.join(partitions)})")
        candidates = {wanted: partitions[wanted]} if wanted else partitions
        reasons = {name: partition_misfit(res, lim, rule) for name, lim in candidates.items()}
        ok = [name for name, why in reasons.items() if why is None]
        if not ok:
            asks = ", ".join(f"{k}={res[k]}" for k in RESOURCE_KEYS if res.get(k) not in (None, 0, ""))
            why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
            raise HardwareError(f"{label} ({asks}) fits no partition in {path} -- {why}")
        fits[rule] = ",".join(ok)
    return fits


# ----------------------------------------------------------------------------------------------------- prerun
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _try(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:
        return None


def _gpu_facts(reader) -> list[dict[str, Any]]:
    nv = reader.nvml
    facts = []
    for dev in reader.devices:
        mem = _try(nv.nvmlDeviceGetMemoryInfo, dev.handle)
        enforced = _try(nv.nvmlDeviceGetEnforcedPowerLimit, dev.handle)
        default = _try(nv.nvmlDeviceGetPowerManagementDefaultLimit, dev.handle)
        facts.append({
            "key": dev.key, "nvml_index": dev.nvml_index, "uuid": dev.uuid, "name": dev.name,
            "memory_total_gb": round(mem.total / 1e9, 2) if mem is not None else None,
            "enforced_power_limit_w": enforced / 1000.0 if enforced is not None else None,
            "default_power_limit_w": default / 1000.0 if default is not None else None,
            "temperature_c": _try(nv.nvmlDeviceGetTemperature, dev.handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
            "power_w": (lambda p: p / 1000.0 if p is not None else None)(_try(nv.nvmlDeviceGetPowerUsage,
                                                                               dev.handle)),
        })
    return facts


def _check(expected: Mapping[str, Any], gpus: list[dict[str, Any]], nvml_error: str | None) -> list[str]:
    problems = []
    if expected["needs_gpu"] and not gpus:
        problems.append(f"expected {expected['gpu_model'] or 'a GPU'} but NVML sees no GPU"
                        + (f" ({nvml_error})" if nvml_error else "")
                        + f"; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    for g in gpus:
        who = f"{g['key']} ({g['name']})"
        model = expected["gpu_model"]
        if model and model.lower() not in g["name"].lower():
            problems.append(f"{who}: GPU model does not contain {model!r} (hardware.expect_gpu_model / preset)")
        mem = expected["gpu_memory_gb"]
        if mem and (g["memory_total_gb"] is None or g["memory_total_gb"] < 0.95 * mem):
            problems.append(f"{who}: {g['memory_total_gb']} GB of memory, expected at least {mem} GB "
                            "(hardware.expect_gpu_memory_gb / preset; 5% tolerance for reserved memory)")
        cap = expected["power_cap_w"]
        if cap is not None:
            got = g["enforced_power_limit_w"]
            if got is None:
                problems.append(f"{who}: hardware.power_cap_w={cap} W but the enforced power limit is unreadable")
            elif abs(got - cap) > 1.0:
                problems.append(f"{who}: enforced power limit is {got:g} W, hardware.power_cap_w is {cap:g} W. "
                                f"The workflow never changes card settings; apply the cap yourself with "
                                f"`sudo nvidia-smi -i {g['nvml_index']} -pl {cap:g}` (docs/SLURM.md) or set "
                                f"power_cap_w to null")
    return problems


def burn_in(seconds: float, *, size: int = 8192) -> dict[str, Any]:
    """Back-to-back bf16 matmuls on every visible CUDA device for ``seconds`` (so clocks and temperature settle)."""
    import torch

    if not torch.cuda.is_available():
        return {"seconds": 0.0, "skipped": "no CUDA device visible to torch"}
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    mats = [(torch.randn(size, size, device=d, dtype=torch.bfloat16),
             torch.randn(size, size, device=d, dtype=torch.bfloat16)) for d in devices]
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        for a, b in mats:
            a @ b
        n += 1
        if n % 16 == 0:  # bound the queue so the time check is honest
            for d in devices:
                torch.cuda.synchronize(d)
    for d in devices:
        torch.cuda.synchronize(d)
    elapsed = time.monotonic() - t0
    tflop = 2 * size**3 * n * len(devices) / 1e12
    return {"seconds": round(elapsed, 3), "matmuls_per_device": n, "matrix_size": size,
            "achieved_tflops_per_device": round(tflop / elapsed / len(devices), 1)}


def prerun(*, out_json: str | os.PathLike, hardware: Mapping[str, Any] | None = None,
           energy: Mapping[str, Any] | None = None, meter: Any = None, nvml_module: Any = None,
           burn_in_fn=burn_in) -> dict[str, Any]:
    """Assert the node matches ``hardware`` (preset / expect_* / power_cap_w), optionally burn in, write the facts.

    Raises :class:`HardwareError` listing every mismatch (the JSON is still written, with ``status: mismatch``,
    so the facts that failed the check can be read). On a CPU-only node with no preset it records and passes.
    """
    from distill_bench.energy.atomic import atomic_write_json
    from distill_bench.energy.nvml import NvmlReader

    hw = dict(hardware or {})
    expected = expected_hardware(hw)
    reader = NvmlReader(module=nvml_module).open()
    gpus = _gpu_facts(reader) if reader.available else []
    driver = _try(reader.nvml.nvmlSystemGetDriverVersion) if reader.nvml is not None else None
    problems = _check(expected, gpus, reader.error)
    burn: dict[str, Any] | None = None
    seconds = float(hw.get("burn_in_s") or 0)
    if not problems and seconds > 0:
        if gpus:
            burn = burn_in_fn(seconds)
            after = _gpu_facts(reader)
            burn["after"] = {g["key"]: {"temperature_c": g["temperature_c"], "power_w": g["power_w"]} for g in after}
        else:
            burn = {"seconds": 0.0, "skipped": "no GPU: burn-in only warms GPUs"}
    reader.close()
    record = {
        "status": "mismatch" if problems else "ok",
        "problems": problems,
        "hardware": hw,
        "expected": expected,
        "host": socket.gethostname(),
        "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST",
                                             "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_JOB_GPUS")
                  if k in os.environ},
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "nvml": {"error": reader.error, "driver_version": _text(driver) if driver is not None else None,
                 "notes": list(reader.notes)},
        "gpus": gpus,
        "burn_in": burn,
        "energy_policy": (energy or {}).get("policy"),
        "note": "card settings are read, never changed; power caps are applied by the user (docs/SLURM.md)",
    }
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_json, record)
    if meter is not None:
        meter.record("hardware_status", record["status"])
        meter.record("gpus", [g["name"] for g in gpus])
    if problems:
        raise HardwareError("prerun: this node does not match the configured hardware:\n  - "
                            + "\n  - ".join(problems) + f"\n(facts in {out_json})")
    return record
