"""Check a finished workflow run against GPU counters read independently of it (scripts/gpu_workflow_check.sh).

    python -m distill_bench.report.run_check RESULTS_DIR --before before.json --after after.json

``before.json``/``after.json`` are ``{"time": ISO, "devices": {"gpu<i>": joules}}`` read with a few lines of pynvml
outside the workflow. Printed: per device the independent counter delta, the stages' GPU energy in that window, the
unattributed share; the wall time; whether the teacher is above every trained student and every student above the
untrained one (95 % CIs not overlapping). Exit status 1 when the stages' sum exceeds an independent delta beyond
the reconciliation's tolerance, so the check cannot pass silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from distill_bench.energy.run_counters import parse_time
from distill_bench.report.reconcile import attempt_windows, tolerance_j


def stage_records(results_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((results_dir / "energy").glob("*.json")):
        record = json.loads(path.read_text())
        if "attempts" in record and "stage_id" in record:
            out[record["stage_id"]] = record
    return out


def energy_check(results_dir: Path, before: dict, after: dict) -> tuple[list[dict], bool]:
    t0, t1 = parse_time(before["time"]), parse_time(after["time"])
    windows = [w for w in attempt_windows(stage_records(results_dir)) if w.start >= t0 and w.end <= t1]
    rows, ok = [], True
    for key in sorted(set(before["devices"]) & set(after["devices"])):
        delta = after["devices"][key] - before["devices"][key]
        stages = sum(w.gpu_j.get(key, 0.0) for w in windows)
        over = stages > delta + tolerance_j(delta)
        ok &= not over
        rows.append({"device": key, "independent_delta_j": delta, "stages_j": stages,
                     "unattributed_j": delta - stages, "unattributed_share": (delta - stages) / delta if delta else None,
                     "stages_over_counter": over, "stage_attempts": sum(1 for w in windows if key in w.gpu_j)})
    return rows, ok


def quality_check(results_dir: Path) -> tuple[list[str], bool]:
    """Teacher above every trained student, every trained student above the untrained one, by CI separation."""
    summary = results_dir / "summary"
    table, refs = pd.read_csv(summary / "comparison.csv"), pd.read_csv(summary / "references.csv")
    teacher = refs[refs.model == "teacher"]
    untrained = refs[refs.model.str.startswith("init.")]
    lines, ok = [], True
    if teacher.empty or untrained.empty:
        return ["quality: teacher or untrained-student reference missing"], False
    t, u = teacher.iloc[0], untrained.iloc[0]
    lines.append(f"teacher {100 * t.flexible_acc:.1f} % [{100 * t.flexible_ci_low:.1f}, {100 * t.flexible_ci_high:.1f}]"
                 f"; untrained student {100 * u.flexible_acc:.1f} % [{100 * u.flexible_ci_low:.1f}, "
                 f"{100 * u.flexible_ci_high:.1f}]")
    for _, r in table.iterrows():
        below_teacher = r.flexible_ci_high < t.flexible_ci_low
        above_untrained = r.flexible_ci_low > u.flexible_ci_high
        ok &= bool(below_teacher and above_untrained)
        lines.append(f"{r.experiment}: {100 * r.flexible_acc:.1f} % [{100 * r.flexible_ci_low:.1f}, "
                     f"{100 * r.flexible_ci_high:.1f}] -- {'below' if below_teacher else 'NOT clearly below'} the "
                     f"teacher, {'above' if above_untrained else 'NOT clearly above'} the untrained student")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill_bench.report.run_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    ns = parser.parse_args(argv)
    before, after = json.loads(ns.before.read_text()), json.loads(ns.after.read_text())
    wall = (parse_time(after["time"]) - parse_time(before["time"])).total_seconds()
    print(f"wall time (independent counter reads around the whole snakemake command): {wall:.1f} s")
    rows, energy_ok = energy_check(ns.results_dir, before, after)
    if not rows:
        print("GPU: no device read independently (no NVML here); energy not checked")
    for r in rows:
        share = r["unattributed_share"]
        print(f"{r['device']}: independent counter delta {r['independent_delta_j'] / 1000:.2f} kJ, stages' GPU energy "
              f"{r['stages_j'] / 1000:.2f} kJ ({r['stage_attempts']} attempts), unattributed "
              f"{r['unattributed_j'] / 1000:.2f} kJ" + (f" ({100 * share:.1f} %)" if share is not None else "")
              + ("  ** STAGES EXCEED THE COUNTER **" if r["stages_over_counter"] else "  (stages <= counter: ok)"))
    recon = ns.results_dir / "summary" / "reconciliation.md"
    if recon.exists():
        print(recon.read_text().splitlines()[2])
    quality_ok = True
    if (ns.results_dir / "summary" / "comparison.csv").exists():
        lines, quality_ok = quality_check(ns.results_dir)
        print("quality:", *lines, sep="\n  ")
    print(f"energy check: {'ok' if energy_ok else 'FAILED'}; quality ordering: "
          f"{'ok' if quality_ok else 'not met (resize configs/gpu_single.yaml)'}")
    return 0 if energy_ok else 1


if __name__ == "__main__":
    sys.exit(main())
