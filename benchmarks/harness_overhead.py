"""Per-stage harness cost before the meter opens: a fresh interpreter importing what `scripts/stage.py` imports
for each stage (the energy package, the stage registry, the stage's module) -- time, and whether torch,
transformers, datasets or pandas came with it. The workflow records the same interval in every stage JSON
(`metrics.harness_overhead_s`, process start to meter open); this isolates the imports.

    python benchmarks/harness_overhead.py --out DIR [--repeats 3] [--quick]

Median of --repeats fresh processes per stage; "python -c pass" is timed the same way and reported as the floor.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEAVY = ("torch", "transformers", "datasets", "pandas")
PROBE = """
import sys, time
t = time.perf_counter()
import distill_bench.energy
from distill_bench.stages import resolve
{body}
dt = time.perf_counter() - t
print(repr((dt, [m for m in {heavy!r} if m in sys.modules])))
"""
# the workflow's non-stage scripts and what they import before doing their work
SCRIPTS = {"idle_baseline": "from distill_bench.energy import EnergySettings, measure_idle",
           "config_snapshot": "from distill_bench.config.snapshot import write_config_snapshot",
           "rollup": "from distill_bench.report.rollup import rollup_run"}


def probe(body: str) -> tuple[float, list[str], float]:
    code = PROBE.format(body=body, heavy=HEAVY)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    dt, heavy = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    return dt, heavy, wall


def main() -> int:
    from distill_bench.stages import STAGES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat, three stages")
    a = ap.parse_args()
    repeats = 1 if a.quick else a.repeats
    names = {f"stage:{n}": f"resolve({n!r})" for n in STAGES}
    names.update({f"script:{n}": body for n, body in SCRIPTS.items()})
    if a.quick:
        names = dict(list(names.items())[:2] + [("script:config_snapshot", SCRIPTS["config_snapshot"])])
    floor = statistics.median(probe("pass")[2] for _ in range(repeats))
    rows = []
    for name, body in names.items():
        samples = [probe(body) for _ in range(repeats)]
        rows.append({"what": name, "imports_s": statistics.median(s[0] for s in samples),
                     "process_s": statistics.median(s[2] for s in samples), "heavy_modules": samples[-1][1]})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "harness_overhead.json").write_text(json.dumps({"python_floor_s": floor, "repeats": repeats,
                                                           "rows": rows}, indent=2))
    print(f"interpreter start + distill_bench.energy floor: {floor:.2f} s (python -c, {repeats} repeats)")
    print("what | imports s (median) | whole process s | heavy modules loaded")
    print("---|---|---|---")
    for r in rows:
        print(f"{r['what']} | {r['imports_s']:.2f} | {r['process_s']:.2f} | {', '.join(r['heavy_modules']) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
