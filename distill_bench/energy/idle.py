"""Idle baseline: power per device while nothing runs, measured the same way stages are measured.

GPU idle comes from the NVML energy counter (power samples where there is no counter); CPU/RAM from RAPL where
readable, else from the same process-attributed estimates stages use (so their idle is ~0 W by construction, and
the system-wide utilisation figure is kept for information only).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from . import cpu_estimate, nvml as nvml_mod, rapl as rapl_mod
from .atomic import atomic_write_json, check_writable_dir
from .meter import utcnow
from .settings import EnergySettings
from .validate import SCHEMA_VERSION, validate_dict


def measure_idle(out_json: str | os.PathLike, seconds: float, settings: EnergySettings | dict | None = None, *,
                 nvml_module: Any = None, rapl_root: str | os.PathLike = rapl_mod.DEFAULT_ROOT,
                 devices: Any = None) -> dict:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"energy.idle_seconds must be a positive number; got {seconds!r}")
    settings = settings if isinstance(settings, EnergySettings) else EnergySettings.from_dict(settings)
    out_json = Path(out_json)
    check_writable_dir(out_json.parent, "idle JSON output")
    nv = nvml_mod.NvmlReader(module=nvml_module, devices=devices).open()
    zones, rapl_error = rapl_mod.discover(rapl_root)
    model = cpu_estimate.cpu_power_model(settings.cpu_tdp_w)
    power_sums: dict[str, list[float]] = {d.key: [] for d in nv.devices}
    try:
        import psutil  # type: ignore

        psutil.cpu_percent(None)
    except Exception:
        psutil = None
    start_time = utcnow()
    # every baseline is read here, as the window opens, so set-up work is not idle power
    rapl = rapl_mod.RaplAccumulator(zones) if zones else None
    cpu0 = cpu_estimate.process_tree_cpu_seconds()
    e0 = nv.read_energy_j() if nv.available else {}
    t0 = time.monotonic()
    rss: list[int] = []
    while True:
        for dev in nv.devices:
            try:
                power_sums[dev.key].append(nv.sample(dev)["power_w"])
            except Exception:
                pass
        rss.append(cpu_estimate.process_tree_rss_bytes())
        if rapl is not None:
            rapl.poll()
        left = seconds - (time.monotonic() - t0)
        if left <= 0:
            break
        time.sleep(min(settings.sample_interval_s, left))
    e1 = nv.read_energy_j() if nv.available else {}
    elapsed = time.monotonic() - t0
    cpu_s = cpu_estimate.process_tree_cpu_seconds() - cpu0
    per_dev: dict[str, Any] = {}
    gpu_w = 0.0
    gpu_src = nvml_mod.UNAVAILABLE
    for dev in nv.devices:
        a, b = e0.get(dev.key), e1.get(dev.key)
        if isinstance(a, float) and isinstance(b, float):
            w, src = (b - a) / elapsed, nvml_mod.COUNTER
        elif power_sums[dev.key]:
            w, src = sum(power_sums[dev.key]) / len(power_sums[dev.key]), nvml_mod.POWER_INTEGRATION
        else:
            continue
        per_dev[dev.key] = {"w": w, "uuid": dev.uuid, "name": dev.name, "source": src}
        gpu_w += w
        gpu_src = src if gpu_src in (nvml_mod.UNAVAILABLE, src) else nvml_mod.POWER_INTEGRATION
    if rapl is not None:
        rapl.poll()
        cpu = {"w": (rapl.joules("package") or 0.0) / elapsed, "source": rapl_mod.SOURCE}
    else:
        cpu = {"w": max(0.0, cpu_s) * model["w_per_busy_thread"] / elapsed, "source": cpu_estimate.CPU_SOURCE}
        if psutil is not None:
            util = psutil.cpu_percent(None) / 100.0
            cpu["system_utilisation"] = util
            cpu["system_w_info"] = util * model["tdp_w_per_package"] * model["packages"]
    dram = rapl.joules("dram") if rapl is not None else None
    if dram is not None:
        ram = {"w": dram / elapsed, "source": rapl_mod.SOURCE}
    else:
        mean_rss = sum(rss) / len(rss) if rss else 0
        ram = {"w": mean_rss / 1e9 * cpu_estimate.RAM_W_PER_GB, "source": cpu_estimate.RAM_SOURCE}
    record = {
        "schema_version": SCHEMA_VERSION, "kind": "idle", "seconds": elapsed, "start_time": start_time,
        "end_time": utcnow(),
        "components": {"gpu": {"w": gpu_w, "source": gpu_src}, "cpu": cpu, "ram": ram},
        "gpu_per_device_w": per_dev,
        "devices": nv.describe(), "rapl_error": rapl_error, "cpu_estimate_model": model,
    }
    nv.close()
    validate_dict(record, "idle", str(out_json))
    atomic_write_json(out_json, record)
    return record
