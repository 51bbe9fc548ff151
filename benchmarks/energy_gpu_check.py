"""GPU check of the energy meter (must-show 3 of issue 2).

Burns one GPU with bf16 matmuls for >= --seconds and reports side by side:
  * the meter's gpu_j (NVML energy counter deltas, after a CUDA synchronize),
  * a raw NVML energy-counter delta taken independently here,
  * trapezoid integration of nvmlDeviceGetPowerUsage polled every --poll-s (100 ms) by our own thread,
  * CodeCarbon's GPU energy (from the meter's per-stage tracker; skipped when codecarbon is not installed),
and the meter's wall-time overhead on a fixed workload (meter off vs on, alternating, median of --reps).
Prints a table and writes JSON to --out. Needs only torch + nvidia-ml-py + distill_bench (codecarbon optional).

    python benchmarks/energy_gpu_check.py --out results/benchmarks/energy_gpu_check.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pynvml  # noqa: E402
import torch  # noqa: E402

from distill_bench.energy import StageMeter, atomic_write_json  # noqa: E402


class PowerPoller(threading.Thread):
    """Independent polled-power integrator (what the original harness did, at a finer period)."""

    def __init__(self, handle, period: float):
        super().__init__(daemon=True)
        self.handle, self.period = handle, period
        self.samples: list[tuple[float, float]] = []
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self.samples.append((time.monotonic(), pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0))
            self.stop_evt.wait(self.period)

    def joules(self) -> float:
        s = self.samples
        return sum(0.5 * (a[1] + b[1]) * (b[0] - a[0]) for a, b in zip(s, s[1:]))


def burn(a: torch.Tensor, b: torch.Tensor, iters: int) -> None:
    for _ in range(iters):
        torch.mm(a, b)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=35.0)
    ap.add_argument("--poll-s", type=float, default=0.1)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--overhead-seconds", type=float, default=8.0, help="length of the fixed overhead workload")
    ap.add_argument("--reps", type=int, default=3)
    ns = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.cuda.set_device(0)
    pynvml.nvmlInit()
    # the meter resolves CUDA device 0 through CUDA_VISIBLE_DEVICES; do the same for our own handle
    import os

    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = vis.split(",")[0].strip() if vis else "0"
    handle = (pynvml.nvmlDeviceGetHandleByUUID(first) if first.startswith(("GPU-", "MIG-"))
              else pynvml.nvmlDeviceGetHandleByIndex(int(first)))
    name = pynvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    driver = pynvml.nvmlSystemGetDriverVersion()
    has_cc = importlib.util.find_spec("codecarbon") is not None
    a = torch.randn(ns.size, ns.size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(ns.size, ns.size, device="cuda", dtype=torch.bfloat16)
    # calibrate iterations per second (also warms up clocks and cuBLAS)
    burn(a, b, 20)
    torch.cuda.synchronize()
    t = time.perf_counter()
    burn(a, b, 200)
    torch.cuda.synchronize()
    it_per_s = 200 / (time.perf_counter() - t)
    tflops = it_per_s * 2 * ns.size**3 / 1e12

    tmp = Path(tempfile.mkdtemp(prefix="energy_gpu_check."))
    # ---- accuracy: burn >= seconds under the meter, with an independent counter + poller
    poller = PowerPoller(handle, ns.poll_s)
    meter = StageMeter(stage="gpu_check", stage_id="gpu_check", role="setup", out_json=tmp / "gpu_check.json",
                       settings={"codecarbon": has_cc, "sample_interval_s": 0.1},
                       devices=[vis.split(",")[0]] if vis else [0])
    meter.start()
    torch.cuda.synchronize()
    raw0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    poller.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < ns.seconds:
        burn(a, b, max(1, int(it_per_s)))
        torch.cuda.synchronize()
    poller.stop_evt.set()
    poller.join()
    raw1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    burn_s = time.monotonic() - t0
    rec = meter.stop()
    raw_j = (raw1 - raw0) / 1000.0
    poll_j = poller.joules()
    meter_j = rec["energy"]["gpu_j"]
    cc = rec.get("codecarbon") or {}
    cc_j = cc["gpu_energy_kwh"] * 3.6e6 if cc.get("gpu_energy_kwh") is not None else None

    # ---- overhead: fixed workload, meter off vs on (CodeCarbon off and on), alternating
    fixed_iters = max(1, int(it_per_s * ns.overhead_seconds))
    variants = [("off", None), ("meter", False)] + ([("meter+codecarbon", True)] if has_cc else [])
    times: dict[str, list[float]] = {k: [] for k, _ in variants}
    wall: dict[str, list[float]] = {k: [] for k, _ in variants}
    for rep in range(ns.reps):
        for key, cc_on in variants:
            tw = time.perf_counter()
            m = None
            if cc_on is not None:
                m = StageMeter(stage="overhead", stage_id=f"overhead-{key}-{rep}", role="setup",
                               out_json=tmp / f"overhead-{key}-{rep}.json",
                               settings={"codecarbon": cc_on, "sample_interval_s": 0.1})
                m.start()
            torch.cuda.synchronize()
            t = time.perf_counter()
            burn(a, b, fixed_iters)
            torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t)
            if m is not None:
                m.stop()
            wall[key].append(time.perf_counter() - tw)
    base = statistics.median(times["off"])
    base_wall = statistics.median(wall["off"])
    overhead = {k: {"work_s": statistics.median(v), "work_overhead_pct": (statistics.median(v) - base) / base * 100,
                    "wall_s_incl_start_stop": statistics.median(wall[k]),
                    "wall_overhead_pct": (statistics.median(wall[k]) - base_wall) / base_wall * 100, "all_work_s": v}
                for k, v in times.items()}

    def dev(x):
        return None if x is None else (x - raw_j) / raw_j * 100

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "card": name, "driver": driver,
        "torch": torch.__version__, "matmul": f"bf16 {ns.size}^3", "tflops": tflops, "burn_s": burn_s,
        "meter_duration_s": rec["duration_s"], "poll_s": ns.poll_s,
        "energy_j": {"meter_gpu_j": meter_j, "raw_counter_j": raw_j, "polled_power_trapezoid_j": poll_j,
                     "codecarbon_gpu_j": cc_j},
        "deviation_vs_raw_counter_pct": {"meter": dev(meter_j), "polled_power": dev(poll_j), "codecarbon": dev(cc_j)},
        "meter_gpu_source": rec["energy"]["sources"]["gpu"], "avg_power_w": rec["power"]["gpu_avg_w"],
        "peak_power_w": rec["power"]["gpu_peak_w"], "codecarbon_error": cc.get("error"),
        "codecarbon_startup_s": cc.get("startup_s"), "overhead": overhead, "fixed_workload_iters": fixed_iters,
    }
    atomic_write_json(ns.out, result)
    print(f"{name} | driver {driver} | {result['date']} | bf16 {ns.size}^3 matmul {tflops:.0f} TFLOP/s, "
          f"{burn_s:.1f} s burn, avg {result['avg_power_w']:.0f} W, peak {result['peak_power_w']:.0f} W")
    print(f"{'method':<38}{'GPU J':>12}{'vs raw counter':>16}")
    for label, v in (("meter gpu_j (" + rec["energy"]["sources"]["gpu"] + ")", meter_j),
                     ("raw NVML counter delta (independent)", raw_j),
                     (f"polled power, trapezoid @ {ns.poll_s * 1000:.0f} ms", poll_j),
                     ("CodeCarbon gpu_energy", cc_j)):
        print(f"{label:<38}{('n/a' if v is None else f'{v:,.1f}'):>12}"
              f"{('' if v is None else f'{dev(v):+.2f} %'):>16}")
    print(f"\n{'overhead (fixed workload)':<26}{'work s':>10}{'work ovh':>10}{'wall s':>10}{'wall ovh':>10}")
    for k, o in overhead.items():
        print(f"{k:<26}{o['work_s']:>10.3f}{o['work_overhead_pct']:>9.2f}%{o['wall_s_incl_start_stop']:>10.3f}"
              f"{o['wall_overhead_pct']:>9.2f}%")
    if cc.get("startup_s") is not None:
        print(f"CodeCarbon tracker start-up (outside the measured window): {cc['startup_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
