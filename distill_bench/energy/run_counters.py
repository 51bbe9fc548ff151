"""Node-wide energy counters read at one instant: the start and end of a workflow run, for the run-level
reconciliation (distill_bench.report.reconcile).

A stage's meter reads the counters of the devices it is given at its own start and end; the run reads every device
the workflow process sees once when Snakemake starts executing (the Snakefile's ``onstart`` handler) and once when
the roll-up runs. The difference between the run's delta and the stages' sum is the energy no stage was charged.

Only pynvml and sysfs are touched: this runs inside the Snakemake process, which must never import torch.
RAPL counters wrap (at ``max_energy_range_uj``, tens of minutes at full load), so :class:`RaplWatch` polls them in a
daemon thread of the Snakemake process and keeps wrap-corrected totals in a file the roll-up reads.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from . import rapl as rapl_mod
from .atomic import atomic_write_json
from .nvml import NvmlReader

RUN_ID_ENV = "DISTILL_BENCH_RUN_ID"
RAPL_WATCH_INTERVAL_S = 10.0


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """Sortable, unique per Snakemake invocation on a node: UTC time of the start plus the process id."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def runs_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "energy" / "runs"


def read_gpu_counters(nvml_module: Any = None, visible_devices: Any = "env") -> dict[str, Any]:
    """Energy counter (J) of every GPU this process sees; a device whose read fails keeps its error text."""
    reader = NvmlReader(module=nvml_module, visible_devices=visible_devices).open()
    try:
        out: dict[str, Any] = {"available": reader.available, "error": reader.error, "devices": []}
        if not reader.available:
            if out["error"] is None:
                out["error"] = "no GPU visible to NVML"
            return out
        readings = reader.read_energy_j()
        for dev in reader.devices:
            value = readings.get(dev.key)
            entry = {"key": dev.key, "index": dev.nvml_index, "uuid": dev.uuid, "name": dev.name,
                     "energy_j": None, "error": None}
            if not dev.has_counter:
                entry["error"] = f"no energy counter: {dev.counter_error}"
            elif isinstance(value, Exception):
                entry["error"] = f"counter read failed: {value}"
            else:
                entry["energy_j"] = value
            out["devices"].append(entry)
        return out
    finally:
        reader.close()


def read_rapl_counters(rapl_root: str | os.PathLike = rapl_mod.DEFAULT_ROOT) -> dict[str, Any]:
    """Raw RAPL package/dram counters (µJ) with their wrap ranges; unreadable RAPL keeps the reason."""
    zones, reason = rapl_mod.discover(rapl_root)
    out: dict[str, Any] = {"available": bool(zones), "error": reason, "zones": []}
    for zone in zones:
        try:
            out["zones"].append({"name": zone.name, "kind": zone.kind, "energy_uj": zone.read_uj(),
                                 "max_range_uj": zone.max_range_uj})
        except (OSError, ValueError) as exc:
            out["zones"].append({"name": zone.name, "kind": zone.kind, "energy_uj": None,
                                 "max_range_uj": zone.max_range_uj, "error": str(exc)})
    return out


def read_counters(nvml_module: Any = None, rapl_root: str | os.PathLike = rapl_mod.DEFAULT_ROOT,
                  visible_devices: Any = "env") -> dict[str, Any]:
    """One snapshot of every counter the node exposes to this process, stamped with wall-clock time and host."""
    gpu = read_gpu_counters(nvml_module, visible_devices)
    cpu = read_rapl_counters(rapl_root)
    return {"time": utcnow(), "host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu": gpu, "rapl": cpu}


class RaplWatch(threading.Thread):
    """Polls RAPL every ``interval_s`` and keeps wrap-corrected totals per zone in ``path`` (atomically replaced).

    One poll per interval resolves at most one wrap between polls, which holds for any interval shorter than the
    wrap period (minutes at full package power).
    """

    def __init__(self, path: Path, baseline_uj: dict[str, int], rapl_root: str | os.PathLike = rapl_mod.DEFAULT_ROOT,
                 interval_s: float = RAPL_WATCH_INTERVAL_S):
        super().__init__(name="distill-bench-rapl-watch", daemon=True)
        self.path = Path(path)
        self.interval_s = interval_s
        zones, self.error = rapl_mod.discover(rapl_root)
        self.zones = [z for z in zones if baseline_uj.get(z.name) is not None]
        self._last = {z.name: int(baseline_uj[z.name]) for z in self.zones}   # the start snapshot's raw values
        self._total = {z.name: 0 for z in self.zones}
        self._stop = threading.Event()

    def poll(self) -> None:
        for zone in self.zones:
            try:
                now = zone.read_uj()
            except (OSError, ValueError):
                continue
            self._total[zone.name] += rapl_mod.wrap_delta(self._last[zone.name], now, zone.max_range_uj)
            self._last[zone.name] = now
        atomic_write_json(self.path, {"time": utcnow(), "interval_s": self.interval_s,
                                      "total_uj": dict(self._total), "last_uj": dict(self._last)})

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:   # a watch must never take the workflow down; the roll-up notes a stale file
                pass

    def stop(self) -> None:
        self._stop.set()


def start_run(results_dir: str | os.PathLike, nvml_module: Any = None,
              rapl_root: str | os.PathLike = rapl_mod.DEFAULT_ROOT, watch: bool = True) -> tuple[str, Path]:
    """Write ``runs/<run_id>/start.json`` and export the run id to the jobs this process spawns.

    Called from the Snakefile's ``onstart`` handler (never on a dry-run, never in a job's own Snakemake process).
    """
    run_id = new_run_id()
    folder = runs_dir(results_dir) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    snapshot = {"run_id": run_id, **read_counters(nvml_module, rapl_root)}
    path = folder / "start.json"
    atomic_write_json(path, snapshot)
    os.environ[RUN_ID_ENV] = run_id
    if watch and snapshot["rapl"]["available"]:
        baseline = {z["name"]: z["energy_uj"] for z in snapshot["rapl"]["zones"]}
        watcher = RaplWatch(folder / "rapl_watch.json", baseline, rapl_root)
        watcher.poll()
        watcher.start()
    return run_id, path


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def latest_finished_run(results_dir: str | os.PathLike) -> str | None:
    """The newest run that has both a start and an end snapshot (for re-rolling a finished run by hand)."""
    folder = runs_dir(results_dir)
    if not folder.is_dir():
        return None
    done = sorted(p.name for p in folder.iterdir() if (p / "start.json").exists() and (p / "end.json").exists())
    return done[-1] if done else None


def seconds_between(start_iso: str, end_iso: str) -> float:
    return (parse_time(end_iso) - parse_time(start_iso)).total_seconds()


def parse_time(value: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))

