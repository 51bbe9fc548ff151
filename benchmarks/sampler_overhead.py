"""Sampler / meter overhead on this CPU machine (must-show 4 of issue 2). Prints a table; optional --out JSON.

A fixed pure-Python workload is timed with no meter, then inside a StageMeter (CodeCarbon off) at several sampling
intervals, alternating the variants to spread the noise of a shared machine. Also reports the cost of one sampler
tick and of meter start+stop. Run: python benchmarks/sampler_overhead.py [--reps 5] [--work 2000000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_bench.energy import StageMeter  # noqa: E402
from distill_bench.energy.sampler import Sampler  # noqa: E402
from distill_bench.energy.sharing import SharingTracker  # noqa: E402


class _ProcessListReader:
    """NvmlReader stand-in for timing the sharing poll: one device listing this process and its parent."""

    available = True

    def __init__(self) -> None:
        import os

        self.devices = [type("Dev", (), {"key": "gpu0", "uuid": "GPU-bench"})()]
        self.pids = {os.getpid(), os.getppid()}

    def running_pids(self, dev) -> set[int]:
        return set(self.pids)


def workload(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def timed(n: int, interval: float | None, tmp: Path) -> tuple[float, float]:
    """(workload seconds, meter start+stop seconds)"""
    if interval is None:
        t = time.perf_counter()
        workload(n)
        return time.perf_counter() - t, 0.0
    t0 = time.perf_counter()
    m = StageMeter(stage="bench", stage_id="bench", role="setup", out_json=tmp / "bench.json",
                   settings={"codecarbon": False, "sample_interval_s": interval})
    m.start()
    t1 = time.perf_counter()
    workload(n)
    t2 = time.perf_counter()
    m.stop()
    t3 = time.perf_counter()
    return t2 - t1, (t1 - t0) + (t3 - t2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", type=int, default=20_000_000)
    ap.add_argument("--out", type=Path, default=None)
    ns = ap.parse_args()
    variants: list[tuple[str, float | None]] = [("no meter", None), ("meter 1 s", 1.0), ("meter 100 ms", 0.1),
                                                ("meter 10 ms", 0.01)]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        workload(ns.work // 10)   # warm-up
        for _ in range(ns.reps):
            for name, interval in variants:
                results[name].append(timed(ns.work, interval, tmp))
        # cost of one sampler tick (no GPU here: process-tree RSS + CPU time, CSV row)
        s = Sampler(nvml=None, rapl=None, interval_s=0.1, timeline_path=tmp / "t.csv", attempt=1,
                    t0=time.monotonic())
        n_ticks = 200
        t = time.perf_counter()
        for _ in range(n_ticks):
            s.sample_once(force_slow=True)
        tick_ms = (time.perf_counter() - t) / n_ticks * 1e3
        s.stop()
        # shared-device check: one NVML process-list poll (fake list of 2 pids, ancestry walked in /proc)
        tracker = SharingTracker(_ProcessListReader(), lock_dir=str(tmp / "locks"))
        t = time.perf_counter()
        for i in range(n_ticks):
            tracker.poll(i * 1.0)
        poll_ms = (time.perf_counter() - t) / n_ticks * 1e3
        # cheap ledger snapshot (every energy.ledger_interval_s): build the record, write it atomically, no fsync
        m = StageMeter(stage="bench", stage_id="ledger", role="setup", out_json=tmp / "ledger.json",
                       settings={"codecarbon": False, "sample_interval_s": 1.0}).start()
        t = time.perf_counter()
        for _ in range(50):
            m._write_ledger()
        ledger_ms = (time.perf_counter() - t) / 50 * 1e3
        m.stop()
    base = statistics.median(w for w, _ in results["no meter"])
    rows = []
    print(f"workload: {ns.work:,} loop iterations, {ns.reps} reps, median; CodeCarbon off; "
          f"python {sys.version.split()[0]}")
    print(f"{'variant':<14}{'work s':>10}{'overhead':>10}{'start+stop s':>14}")
    for name, _ in variants:
        w = statistics.median(x for x, _ in results[name])
        ss = statistics.median(y for _, y in results[name])
        over = (w - base) / base * 100
        rows.append({"variant": name, "work_s": w, "overhead_pct": over, "start_stop_s": ss,
                     "all_work_s": [x for x, _ in results[name]]})
        print(f"{name:<14}{w:>10.3f}{over:>9.2f}%{ss:>14.4f}")
    print(f"one sampler slow tick (tree RSS + CPU time + CSV row): {tick_ms:.3f} ms; the fast tick on a CPU-only "
          f"host does nothing but wait")
    print(f"one shared-device poll (NVML process list of 2 pids, on the slow tick = once a second): {poll_ms:.3f} ms "
          "+ the NVML query itself")
    print(f"one ledger snapshot (every energy.ledger_interval_s, default 2 s): {ledger_ms:.3f} ms")
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps({"rows": rows, "slow_tick_ms": tick_ms, "sharing_poll_ms": poll_ms,
                                     "ledger_snapshot_ms": ledger_ms, "work": ns.work, "reps": ns.reps},
                                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
