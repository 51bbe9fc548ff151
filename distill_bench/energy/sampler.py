"""Background power timeline: GPU power/clock/utilisation/memory/temperature every ``interval_s``, process-tree
RSS + CPU and RAPL polls every "slow tick" (max(interval, 1 s)), written as a compact CSV beside the stage JSON.

Energy from counters never depends on this thread; it provides the avg/peak power, the trapezoid integral used for
counter-less GPUs, the RAM integral and RAPL wrap-safe polling. A starved thread only coarsens those.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import cpu_estimate
from .nvml import NvmlReader
from .rapl import RaplAccumulator

GPU_FIELDS = ("power_w", "sm_mhz", "util_pct", "mem_mib", "temp_c")


class _Integral:
    """Trapezoid integral of a sampled quantity, with peak and last-sample time."""

    def __init__(self) -> None:
        self.total = 0.0
        self.last_t: float | None = None
        self.last_v: float | None = None
        self.first_t: float | None = None
        self.peak: float | None = None
        self.n = 0

    def add(self, t: float, v: float) -> None:
        if self.last_t is not None and self.last_v is not None and t > self.last_t:
            self.total += 0.5 * (v + self.last_v) * (t - self.last_t)
        if self.first_t is None:
            self.first_t = t
        self.last_t, self.last_v = t, v
        self.peak = v if self.peak is None else max(self.peak, v)
        self.n += 1

    @property
    def span(self) -> float:
        return 0.0 if self.first_t is None or self.last_t is None else self.last_t - self.first_t


class Sampler:
    def __init__(self, *, nvml: NvmlReader | None, rapl: RaplAccumulator | None, interval_s: float,
                 timeline_path: Path | None, attempt: int, t0: float, append: bool = False,
                 on_tick: Callable[[], None] | None = None, slow_every_s: float = 1.0, track_process: bool = True,
                 sharing: Any = None):
        self.nvml = nvml if nvml is not None and nvml.available else None
        self.rapl = rapl
        self.interval_s = interval_s
        self.slow_every_s = max(interval_s, slow_every_s)
        self.timeline_path = timeline_path
        self.attempt = attempt
        self.t0 = t0
        self.on_tick = on_tick
        self.track_process = track_process
        self.sharing = sharing                 # SharingTracker polled on the slow tick (NVML process lists)
        self.lock = threading.RLock()
        self.gpu_power: dict[str, _Integral] = {d.key: _Integral() for d in (self.nvml.devices if self.nvml else [])}
        self.total_gpu_power = _Integral()
        self.rss_bytes = _Integral()           # integral in byte-seconds
        self.errors: dict[str, str] = {}       # first error per device
        self.error_counts: dict[str, int] = {}
        self.samples = 0
        self._last_slow = -math.inf
        self._last_cpu_s: tuple[float, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fh = None
        self._buffer: list[str] = []
        if timeline_path is not None:
            new = not (append and timeline_path.exists() and timeline_path.stat().st_size > 0)
            self._fh = open(timeline_path, "a" if not new else "w", encoding="utf-8")
            if new:
                self._fh.write(",".join(self.columns()) + "\n")

    def columns(self) -> list[str]:
        cols = ["attempt", "t_s"]
        for key in self.gpu_power:
            cols += [f"{key}_{f}" for f in GPU_FIELDS]
        return cols + ["proc_rss_mib", "proc_cpu_pct"]

    # --- sampling ---------------------------------------------------------------------------------------------
    def sample_once(self, force_slow: bool = False) -> None:
        now = time.monotonic()
        t = now - self.t0
        cells: list[str] = [str(self.attempt), f"{t:.3f}"]
        total_power = 0.0
        all_ok = bool(self.gpu_power)
        with self.lock:
            if self.nvml is not None:
                for dev in self.nvml.devices:
                    try:
                        row = self.nvml.sample(dev)
                    except Exception as exc:
                        self.errors.setdefault(dev.key, f"{type(exc).__name__}: {exc}")
                        self.error_counts[dev.key] = self.error_counts.get(dev.key, 0) + 1
                        cells += [""] * len(GPU_FIELDS)
                        all_ok = False
                        continue
                    self.gpu_power[dev.key].add(t, row["power_w"])
                    total_power += row["power_w"]
                    cells += ["" if row[f] is None else f"{row[f]:.{3 if f == 'power_w' else 0}f}" for f in GPU_FIELDS]
            if all_ok:
                self.total_gpu_power.add(t, total_power)
            slow = force_slow or (now - self._last_slow) >= self.slow_every_s - 1e-3
            if slow and self.track_process:
                self._last_slow = now
                rss = cpu_estimate.process_tree_rss_bytes()
                cpu_s = cpu_estimate.process_tree_cpu_seconds()
                self.rss_bytes.add(t, float(rss))
                pct = ""
                if self._last_cpu_s is not None and t > self._last_cpu_s[0]:
                    pct = f"{100.0 * (cpu_s - self._last_cpu_s[1]) / (t - self._last_cpu_s[0]):.1f}"
                self._last_cpu_s = (t, cpu_s)
                if self.rapl is not None:
                    self.rapl.poll()
                cells += [f"{rss / 2**20:.1f}", pct]
            else:
                cells += ["", ""]
            if slow and self.sharing is not None:
                try:
                    self.sharing.poll(t)
                except Exception as exc:
                    self.errors.setdefault("sharing", f"{type(exc).__name__}: {exc}")
            self.samples += 1
            if self._fh is not None and (self.nvml is not None or slow):
                self._buffer.append(",".join(cells) + "\n")
                if slow:
                    self.flush()

    def flush(self) -> None:
        with self.lock:
            if self._fh is not None and self._buffer:
                self._fh.write("".join(self._buffer))
                self._fh.flush()
                self._buffer.clear()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            next_t += self.interval_s
            delay = next_t - time.monotonic()
            if delay < 0:            # fell behind (GIL starvation): skip missed ticks rather than burst
                next_t = time.monotonic()
                delay = 0
            if self._stop.wait(delay):
                break
            try:
                self.sample_once()
                if self.on_tick is not None:
                    self.on_tick()
            except Exception as exc:  # never let the sampler kill the stage
                self.errors.setdefault("sampler", f"{type(exc).__name__}: {exc}")

    def start(self) -> None:
        self.sample_once(force_slow=True)
        self._thread = threading.Thread(target=self._run, name="distill-bench-energy-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and take one last sample so integrals close at the stage end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 5 * self.interval_s))
        self.sample_once(force_slow=True)
        self.flush()
        with self.lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    # --- results ----------------------------------------------------------------------------------------------
    def ram_gb_seconds(self) -> float:
        return self.rss_bytes.total / 1e9

    def power_summary(self) -> dict[str, Any]:
        tot = self.total_gpu_power
        avg = tot.total / tot.span if tot.span > 0 else (tot.last_v if tot.n else None)
        per = {}
        for key, integ in self.gpu_power.items():
            per[key] = {"avg_w": (integ.total / integ.span if integ.span > 0 else integ.last_v),
                        "peak_w": integ.peak, "samples": integ.n}
        return {"gpu_avg_w": avg, "gpu_peak_w": tot.peak, "per_device": per}
