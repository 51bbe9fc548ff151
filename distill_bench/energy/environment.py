"""Environment snapshot, once per run: hardware, driver, packages, git state, SLURM -- what a reader needs to trust
(or reproduce) the energy numbers. Never imports torch (reads its version from package metadata)."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import cpu_estimate
from distill_bench.atomic import atomic_write_json
from .meter import utcnow
from .nvml import NvmlReader, _text
from .validate import SCHEMA_VERSION, validate_dict

PACKAGES = ("distill-bench", "torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "snakemake",
            "codecarbon", "nvidia-ml-py", "lm_eval", "vllm", "numpy", "psutil")


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _git(cwd: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": (bool(status) if status is not None else None),
            "root": run("rev-parse", "--show-toplevel")}


def _gpus(nvml_module: Any = None) -> dict[str, Any]:
    reader = NvmlReader(module=nvml_module).open()
    out: dict[str, Any] = {"error": reader.error, "notes": reader.notes, "devices": []}
    nv = reader.nvml
    if nv is None:
        return out
    for name, fn in (("driver_version", "nvmlSystemGetDriverVersion"), ("cuda_driver_version", "nvmlSystemGetCudaDriverVersion")):
        try:
            out[name] = _text(getattr(nv, fn)())
        except Exception:
            out[name] = None
    for dev in reader.devices:
        d = dev.describe()
        for key, call in (("memory_total_mib", lambda h: nv.nvmlDeviceGetMemoryInfo(h).total / 2**20),
                          ("power_limit_w", lambda h: nv.nvmlDeviceGetPowerManagementLimit(h) / 1000.0),
                          ("max_sm_clock_mhz", lambda h: nv.nvmlDeviceGetMaxClockInfo(h, getattr(nv, "NVML_CLOCK_SM", 1))),
                          ("max_mem_clock_mhz", lambda h: nv.nvmlDeviceGetMaxClockInfo(h, getattr(nv, "NVML_CLOCK_MEM", 2)))):
            try:
                d[key] = float(call(dev.handle))
            except Exception:
                d[key] = None
        out["devices"].append(d)
    reader.close()
    return out


def write_environment_snapshot(out_json: str | os.PathLike, *, nvml_module: Any = None) -> dict:
    out_json = Path(out_json)
    try:
        import psutil  # type: ignore

        ram_gb = psutil.virtual_memory().total / 1e9
    except Exception:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    torch = sys.modules.get("torch")
    record = {
        "schema_version": SCHEMA_VERSION, "kind": "environment", "time": utcnow(), "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0], "executable": sys.executable,
        "packages": {p: _version(p) for p in PACKAGES},
        "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None) if torch else None,
        "cpu": {**cpu_estimate.cpu_power_model(), "physical_cores": _physical_cores()},
        "ram_gb": ram_gb,
        "gpus": _gpus(nvml_module),
        "git": _git(Path(__file__).resolve().parent),
        "slurm": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM_") and
                  any(s in k for s in ("JOB", "NODE", "CPUS", "GPUS", "PARTITION", "NTASKS", "LOCALID", "PROCID",
                                       "CLUSTER", "MEM"))},
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
    }
    validate_dict(record, "environment", str(out_json))
    atomic_write_json(out_json, record)
    return record


def _physical_cores() -> int | None:
    try:
        import psutil  # type: ignore

        return psutil.cpu_count(logical=False)
    except Exception:
        return None
