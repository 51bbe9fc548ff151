"""Run-level reconciliation: every device's own counter over the whole run against the sum of the stages' figures.

A stage's meter charges itself the delta of the counters of the devices it sees. If two stages ran on one device at
the same time, both charge themselves the whole device and the table double counts; if the device sat idle between
stages (process start-up, scheduling, a job that died before its first snapshot), nobody is charged. The workflow
reads every counter when it starts (``runs/<run_id>/start.json``, the Snakefile's ``onstart``) and the roll-up reads
them again as the run's end; this module compares the two deltas with the stage attempts whose windows lie inside
the run on the same host, and enforces the invariant

    sum of the stages' energy on a device <= the device's counter delta over the run + tolerance

Tolerance: ``max(TOLERANCE_ABS_J, TOLERANCE_REL x device total)``. With counters on both sides the arithmetic is
exact (the counters are monotone and the stages' windows lie inside the run's, so disjoint windows telescope to at
most the run's delta; NVML counts in mJ, RAPL in µJ): the margin only absorbs stages whose GPU figure is a sampled
power integral (no counter, or NVML failing mid-stage), measured within 0.7 % of the counter on an H200. Sharing a
device overcounts by the overlapping stages' whole energy -- 2.38x in the case that motivated this check -- far
beyond it.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_bench.energy import rapl as rapl_mod
from distill_bench.energy import run_counters

TOLERANCE_ABS_J = 1.0
TOLERANCE_REL = 0.005
OVERLAP_MIN_S = 0.1           # windows are stamped to the millisecond; sequential jobs never overlap by this much
RAPL_SOURCE = "measured:rapl"
SHARED_LABEL = "+shared_device"


class ReconciliationError(RuntimeError):
    """The stages' energy exceeds a device's own counter over the run: some stages were charged the same energy."""


def tolerance_j(total_j: float) -> float:
    return max(TOLERANCE_ABS_J, TOLERANCE_REL * abs(total_j))


@dataclass
class Window:
    """One metered attempt of one stage, on the wall clock."""
    stage_id: str
    attempt: int
    role: str
    status: str
    start: _dt.datetime
    end: _dt.datetime
    host: str | None
    gpu_j: dict[str, float] = field(default_factory=dict)
    cpu_j: float = 0.0
    cpu_source: str = "unavailable"
    ram_j: float = 0.0
    ram_source: str = "unavailable"

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def label(self) -> str:
        return self.stage_id if self.attempt == 1 else f"{self.stage_id} (attempt {self.attempt})"


def attempt_windows(stages: dict[str, dict]) -> list[Window]:
    """Every attempt of every stage JSON as a wall-clock window with its per-device energy."""
    out = []
    for stage_id, stage in stages.items():
        for number, attempt in enumerate(stage.get("attempts") or [], start=1):
            energy = attempt.get("energy") or {}
            # our own meter's components, also under the codecarbon policy (where `components` are CodeCarbon's)
            comps = energy.get("measured_components") or energy.get("components") or {}
            cpu, ram = comps.get("cpu") or {}, comps.get("ram") or {}
            out.append(Window(
                stage_id=stage_id, attempt=int(attempt.get("attempt") or number), role=str(stage.get("role")),
                status=str(attempt.get("status")), start=run_counters.parse_time(attempt["start_time"]),
                end=run_counters.parse_time(attempt["end_time"]), host=attempt.get("host"),
                gpu_j={k: float(v) for k, v in (energy.get("per_device_j") or {}).items()},
                cpu_j=float(cpu.get("j") or 0.0), cpu_source=str(cpu.get("source") or "unavailable"),
                ram_j=float(ram.get("j") or 0.0), ram_source=str(ram.get("source") or "unavailable")))
    return sorted(out, key=lambda w: (w.start, w.stage_id))


def split_by_run(windows: list[Window], start: dict, end: dict) -> dict[str, list[Window]]:
    """inside: this run, this host; earlier: before the run started (a partial rerun's untouched stages);
    other_host: ran elsewhere (SLURM), not comparable with this node's counters; straddling: neither."""
    t0, t1 = run_counters.parse_time(start["time"]), run_counters.parse_time(end["time"])
    host = start.get("host")
    groups: dict[str, list[Window]] = {"inside": [], "earlier": [], "other_host": [], "straddling": []}
    for w in windows:
        if w.host and host and w.host != host:
            groups["other_host"].append(w)
        elif w.end <= t0:
            groups["earlier"].append(w)
        elif w.start >= t0 and w.end <= t1:
            groups["inside"].append(w)
        else:
            groups["straddling"].append(w)
    return groups


def union_seconds(windows: list[Window]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for w in sorted(windows, key=lambda w: w.start):
        if cur_end is None or w.start > cur_end:
            if cur_end is not None:
                total += (cur_end - cur_start).total_seconds()
            cur_start, cur_end = w.start, w.end
        else:
            cur_end = max(cur_end, w.end)
    if cur_end is not None:
        total += (cur_end - cur_start).total_seconds()
    return total


def overlaps(windows: list[Window]) -> list[dict[str, Any]]:
    """Pairs of windows that overlap in time by more than OVERLAP_MIN_S, with the overlap in seconds."""
    found = []
    ordered = sorted(windows, key=lambda w: w.start)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.start >= a.end:
                break
            seconds = (min(a.end, b.end) - b.start).total_seconds()
            if seconds > OVERLAP_MIN_S:
                found.append({"a": a.label(), "b": b.label(), "seconds": round(seconds, 3)})
    return found


def gaps(windows: list[Window], t0: _dt.datetime, t1: _dt.datetime, top: int = 5) -> list[dict[str, Any]]:
    """The longest stretches of the run no window covers, with the stages on either side."""
    out, cursor, before = [], t0, "run start"
    for w in sorted(windows, key=lambda w: w.start):
        if w.start > cursor:
            out.append({"from": before, "to": w.label(), "seconds": round((w.start - cursor).total_seconds(), 3)})
        if w.end > cursor:
            cursor, before = w.end, w.label()
    if t1 > cursor:
        out.append({"from": before, "to": "run end (roll-up)", "seconds": round((t1 - cursor).total_seconds(), 3)})
    return sorted(out, key=lambda g: -g["seconds"])[:top]


def _gpu_delta(key: str, start: dict | None, end: dict | None) -> tuple[float | None, str, str | None]:
    """(joules, status, reason) of one GPU's counter over the run."""
    if start is None or end is None:
        where = "start" if start is None else "end"
        return None, "missing", f"{key} was not visible to NVML at the run's {where}"
    for snap, where in ((start, "start"), (end, "end")):
        if snap.get("energy_j") is None:
            return None, "unreadable", f"{key} at the run's {where}: {snap.get('error') or 'no reading'}"
    if start.get("uuid") and end.get("uuid") and start["uuid"] != end["uuid"]:
        return None, "missing", f"{key} is a different device at the end ({end['uuid']}) than at the start"
    delta = float(end["energy_j"]) - float(start["energy_j"])
    if delta < 0:
        # NVML's counter is 64-bit mJ (no wrap in practice): going backwards means a driver reload or device reset
        return None, "reset", (f"{key}: counter went backwards ({start['energy_j']:.3f} J -> {end['energy_j']:.3f} J): "
                               "driver reload or device reset during the run; its total is unknown")
    return delta, "reconciled", None


def _rapl_totals(start: dict, end: dict, watch: dict | None) -> dict[str, dict[str, Any]]:
    """Wrap-corrected RAPL energy (J) per kind (package -> cpu, dram -> ram) over the run."""
    out: dict[str, dict[str, Any]] = {}
    ends = {z["name"]: z for z in end.get("zones") or []}
    watched = (watch or {}).get("total_uj") or {}
    last = (watch or {}).get("last_uj") or {}
    for zone in start.get("zones") or []:
        kind = "cpu" if zone["kind"] == "package" else "ram"
        entry = out.setdefault(kind, {"j": 0.0, "wraps": 0, "zones": [], "errors": [], "notes": []})
        other = ends.get(zone["name"])
        if zone.get("energy_uj") is None or other is None or other.get("energy_uj") is None:
            entry["errors"].append(f"RAPL zone {zone['name']} unreadable at the run's "
                                   f"{'start' if zone.get('energy_uj') is None else 'end'}")
            continue
        s, e, rng = int(zone["energy_uj"]), int(other["energy_uj"]), int(zone["max_range_uj"])
        if zone["name"] in watched:
            tail_from = int(last[zone["name"]])
            uj = int(watched[zone["name"]]) + rapl_mod.wrap_delta(tail_from, e, rng)
            wraps = round((uj - (e - s)) / rng) if rng else 0
        else:
            uj = rapl_mod.wrap_delta(s, e, rng)
            wraps = int(e < s)
            entry["notes"].append(f"{zone['name']}: no RAPL watch file, at most one wrap assumed between start and end")
        entry["j"] += uj / 1e6
        entry["wraps"] += max(0, wraps)
        entry["zones"].append(zone["name"])
    return out


def _device_entry(device: str, kind: str, total: float | None, status: str, reason: str | None,
                  members: list[tuple[Window, float]], t0, t1, duration: float) -> dict[str, Any]:
    wins = [w for w, _ in members]
    stage_j = sum(j for _, j in members)
    covered = union_seconds(wins)
    entry: dict[str, Any] = {
        "device": device, "kind": kind, "status": status, "reason": reason, "counter_total_j": total,
        "stages_j": stage_j, "unattributed_j": None, "unattributed_share": None, "stage_seconds": covered,
        "unattributed_s": max(0.0, duration - covered), "n_windows": len(wins),
        "stages": [{"stage_id": w.stage_id, "attempt": w.attempt, "j": j, "start": w.start.isoformat(),
                    "end": w.end.isoformat()} for w, j in members],
        "overlaps": overlaps(wins), "gaps": gaps(wins, t0, t1), "violation": False, "excess_j": 0.0,
        "tolerance_j": None}
    if total is not None:
        entry["unattributed_j"] = total - stage_j
        entry["unattributed_share"] = (total - stage_j) / total if total > 0 else None
        entry["tolerance_j"] = tolerance_j(total)
        if stage_j > total + entry["tolerance_j"]:
            entry["violation"] = True
            entry["excess_j"] = stage_j - total
    return entry


def reconcile(start: dict, end: dict, stages: dict[str, dict], rapl_watch: dict | None = None) -> dict[str, Any]:
    """The reconciliation record of one run (see the module docstring); pure: no file or device access."""
    t0, t1 = run_counters.parse_time(start["time"]), run_counters.parse_time(end["time"])
    duration = (t1 - t0).total_seconds()
    groups = split_by_run(attempt_windows(stages), start, end)
    inside = groups["inside"]
    devices: list[dict[str, Any]] = []

    starts = {d["key"]: d for d in (start.get("gpu") or {}).get("devices") or []}
    ends = {d["key"]: d for d in (end.get("gpu") or {}).get("devices") or []}
    metered = {k for w in inside for k in w.gpu_j}
    keys = sorted(set(starts) | set(ends) | metered, key=lambda k: (len(k), k))
    for key in keys:
        total, status, reason = _gpu_delta(key, starts.get(key), ends.get(key))
        members = [(w, w.gpu_j[key]) for w in inside if key in w.gpu_j]
        entry = _device_entry(key, "gpu", total, status, reason, members, t0, t1, duration)
        ref = starts.get(key) or ends.get(key) or {}
        entry.update(uuid=ref.get("uuid"), name=ref.get("name"))
        devices.append(entry)
    if not keys:
        errors = [e for e in ((start.get("gpu") or {}).get("error"), (end.get("gpu") or {}).get("error")) if e]
        devices.append({"device": "gpu", "kind": "gpu", "status": "unavailable",
                        "reason": errors[0] if errors else "no GPU visible", "counter_total_j": None,
                        "stages_j": 0.0, "violation": False})

    rapl_start, rapl_end = start.get("rapl") or {}, end.get("rapl") or {}
    cpu_windows = [w for w in inside]
    estimated = sorted({w.cpu_source for w in cpu_windows if w.cpu_source != RAPL_SOURCE})
    if rapl_start.get("available") and rapl_end.get("available"):
        totals = _rapl_totals(rapl_start, rapl_end, rapl_watch)
        for kind, source_attr, j_attr in (("cpu", "cpu_source", "cpu_j"), ("ram", "ram_source", "ram_j")):
            if kind not in totals:
                continue
            t = totals[kind]
            members = [(w, getattr(w, j_attr)) for w in inside if getattr(w, source_attr) == RAPL_SOURCE]
            status, reason = "reconciled", None
            if t["errors"]:
                status, reason = "unreadable", "; ".join(t["errors"])
            entry = _device_entry(f"rapl:{kind}", kind, None if t["errors"] else t["j"], status, reason, members,
                                  t0, t1, duration)
            entry.update(zones=t["zones"], wraps=t["wraps"], notes=t["notes"])
            others = sorted({getattr(w, source_attr) for w in inside if getattr(w, source_attr) != RAPL_SOURCE})
            if others:
                entry["notes"].append(f"{sum(1 for w in inside if getattr(w, source_attr) != RAPL_SOURCE)} "
                                      f"window(s) with {kind} from {', '.join(others)}: not in this sum")
            devices.append(entry)
    else:
        reason = rapl_start.get("error") or rapl_end.get("error") or "RAPL unreadable"
        devices.append({"device": "cpu", "kind": "cpu", "status": "unavailable",
                        "reason": f"RAPL not readable ({reason}); the stages' CPU and RAM figures are "
                                  f"{', '.join(estimated) if estimated else 'estimates'} and cannot be reconciled",
                        "counter_total_j": None, "stages_j": sum(w.cpu_j for w in cpu_windows), "violation": False,
                        "stage_seconds": union_seconds(cpu_windows),
                        "unattributed_s": max(0.0, duration - union_seconds(cpu_windows)),
                        "overlaps": overlaps(cpu_windows), "gaps": gaps(cpu_windows, t0, t1)})

    violations = [d for d in devices if d.get("violation")]
    return {
        "run_id": start.get("run_id"), "host": start.get("host"), "start_time": start["time"], "end_time": end["time"],
        "duration_s": duration,
        "tolerance": {"abs_j": TOLERANCE_ABS_J, "rel": TOLERANCE_REL,
                      "rule": "stages' sum <= counter total + max(abs_j, rel x total)"},
        "windows": {"in_run": len(inside), "stage_ids": sorted({w.stage_id for w in inside}),
                    "earlier_runs": sorted({w.label() for w in groups["earlier"]}),
                    "other_hosts": sorted({f"{w.label()} on {w.host}" for w in groups["other_host"]}),
                    "straddling": sorted({w.label() for w in groups["straddling"]})},
        "stage_seconds": union_seconds(inside), "unattributed_s": max(0.0, duration - union_seconds(inside)),
        "overlaps": overlaps(inside),
        "devices": devices,
        "violations": [violation_message(d) for d in violations],
    }


def violation_message(entry: dict[str, Any]) -> str:
    pairs = entry.get("overlaps") or []
    if pairs:
        named = "; ".join(f"{p['a']} and {p['b']} overlap by {p['seconds']:.1f} s" for p in pairs)
        why = f"overlapping stages on {entry['device']}: {named}"
    else:
        why = "no two stage windows overlap on it: check the stages' sources (power integration, hand edits)"
    return (f"{entry['device']}: the stages' sum {entry['stages_j']:.1f} J exceeds the device's own counter over "
            f"the run, {entry['counter_total_j']:.1f} J, by {entry['excess_j']:.1f} J (tolerance "
            f"{entry['tolerance_j']:.1f} J); {why}")


def shared_stage_ids(stages: dict[str, dict], record: dict | None = None) -> set[str]:
    """Stages charged energy of a device something else used at the same time: reported by their meter (``sharing``,
    or ``+shared_device`` in the GPU source) or found here (their windows overlap on one device in this run)."""
    shared = set()
    for stage_id, stage in stages.items():
        sharing = stage.get("sharing") or {}
        sources = ((stage.get("energy") or {}).get("sources") or {})
        if sharing.get("shared") or SHARED_LABEL in str(sources.get("gpu") or ""):
            shared.add(stage_id)
    for entry in (record or {}).get("devices") or []:
        if entry.get("kind") != "gpu" and not str(entry.get("device")).startswith("rapl:"):
            continue   # CPU estimates are per process tree: concurrent CPU stages do not share them
        for pair in entry.get("overlaps") or []:
            shared.update(label.split(" (attempt")[0] for label in (pair["a"], pair["b"]))
    return shared


def _kj(j: float | None) -> str:
    if j is None:
        return "n/a"
    return f"{j / 1000:.2f} kJ" if abs(j) >= 1000 else f"{j:.1f} J"


def summary_line(record: dict[str, Any]) -> str:
    """One line for comparison.md: what the counters saw, what the stages were charged, what nobody was."""
    if record.get("status") == "no_run_snapshot":
        return f"Reconciliation: not done ({record['reason']})."
    parts = []
    for d in record["devices"]:
        if d["status"] == "reconciled":
            share = d["counter_total_j"] and d["stages_j"] / d["counter_total_j"]
            parts.append(f"{d['device']} stages {_kj(d['stages_j'])} of {_kj(d['counter_total_j'])} counted "
                         f"({100 * share:.1f} %), unattributed {_kj(d['unattributed_j'])} over "
                         f"{d['unattributed_s']:.0f} s" + (" — VIOLATION" if d["violation"] else ""))
        elif d["kind"] == "gpu" and d["device"] == "gpu":
            parts.append(f"GPU unavailable ({d['reason']})")
        elif d["kind"] == "cpu" and d["device"] == "cpu":
            parts.append("CPU not reconciled (RAPL unreadable; stage CPU figures are estimates)")
        else:
            parts.append(f"{d['device']} {d['status']} ({d['reason']})")
    coverage = (f"stage windows cover {record['stage_seconds']:.0f} of {record['duration_s']:.0f} s "
                f"({record['unattributed_s']:.0f} s between stages)")
    earlier = record["windows"]["earlier_runs"]
    tail = f"; {len(earlier)} stage attempt(s) from earlier runs not counted" if earlier else ""
    return (f"Reconciliation (run {record['run_id']}, {record['windows']['in_run']} stage attempt(s) in "
            f"{record['duration_s']:.0f} s): " + "; ".join(parts) + f"; {coverage}{tail}.")


def _seconds(entry: dict[str, Any]) -> str:
    return f"{entry['unattributed_s']:.1f}" if entry.get("unattributed_s") is not None else "n/a"


def markdown(record: dict[str, Any]) -> str:
    lines = ["# Run-level energy reconciliation", ""]
    if record.get("status") == "no_run_snapshot":
        return "\n".join(lines + [summary_line(record), ""])
    lines += [summary_line(record), "",
              f"Run `{record['run_id']}` on `{record['host']}`: {record['start_time']} -> {record['end_time']} "
              f"({record['duration_s']:.1f} s). Invariant: {record['tolerance']['rule']} "
              f"(abs {record['tolerance']['abs_j']} J, rel {100 * record['tolerance']['rel']:.1f} %).", "",
              "| device | status | counter total | stages' sum | unattributed | unattributed s | windows | note |",
              "|---|---|---|---|---|---|---|---|"]
    for d in record["devices"]:
        share = d.get("unattributed_share")
        unattributed = _kj(d.get("unattributed_j")) + (f" ({100 * share:.1f} %)" if share is not None else "")
        note = d.get("reason") or "; ".join(d.get("notes") or [])
        if d.get("wraps"):
            note = (note + "; " if note else "") + f"counter wrapped {d['wraps']}x (corrected)"
        lines.append(f"| {d['device']} | {d['status']}{' **VIOLATION**' if d.get('violation') else ''} | "
                     f"{_kj(d.get('counter_total_j'))} | {_kj(d.get('stages_j'))} | {unattributed} | "
                     f"{_seconds(d)} | {d.get('n_windows', '')} | {note or ''} |")
    if record["violations"]:
        lines += ["", "Violations (the roll-up fails on these unless `energy.accept_shared_devices: true`):", ""]
        lines += [f"- {v}" for v in record["violations"]]
    if record["overlaps"]:
        lines += ["", "Overlapping stage windows (concurrent stages on this host):", ""]
        lines += [f"- {p['a']} and {p['b']}: {p['seconds']:.1f} s" for p in record["overlaps"][:20]]
        if len(record["overlaps"]) > 20:
            lines.append(f"- ... {len(record['overlaps']) - 20} more in reconciliation.json")
    biggest = next((d.get("gaps") for d in record["devices"] if d.get("gaps")), None)
    if biggest:
        lines += ["", "Longest unattributed stretches (process start-up, scheduling, idle):", ""]
        lines += [f"- {g['seconds']:.1f} s between {g['from']} and {g['to']}" for g in biggest]
    w = record["windows"]
    for key, text in (("earlier_runs", "from earlier runs (outside this run's window, not counted)"),
                      ("other_hosts", "on other hosts (not comparable with this node's counters)"),
                      ("straddling", "straddling the run's start or end (not counted)")):
        if w[key]:
            lines += ["", f"Stage attempts {text}: " + ", ".join(w[key][:30])
                      + (f" ... ({len(w[key])} in all)" if len(w[key]) > 30 else "")]
    return "\n".join(lines) + "\n"


def write(record: dict[str, Any], summary_dir: Path, run_folder: Path | None = None) -> None:
    from distill_bench.energy import atomic_write_json, atomic_write_text

    summary_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(summary_dir / "reconciliation.json", record)
    atomic_write_text(summary_dir / "reconciliation.md", markdown(record))
    if run_folder is not None and run_folder.is_dir():   # kept even when a failed roll-up's outputs are removed
        atomic_write_json(run_folder / "reconciliation.json", record)
        atomic_write_text(run_folder / "reconciliation.md", markdown(record))
        record["files"] = str(run_folder / "reconciliation.md")


def enforce(record: dict[str, Any], accept_shared: bool) -> None:
    if record.get("violations") and not accept_shared:
        raise ReconciliationError(
            "run-level reconciliation failed: " + " | ".join(record["violations"])
            + ". Stages were charged the same energy twice; run them one per device (GPU leases, or --cores 1) "
              "or set energy.accept_shared_devices: true to keep such numbers, marked, out of N* and the frontier"
            + (f". Details: {record['files']}" if record.get("files") else ""))


def reconcile_run(results_dir: str | os.PathLike, stages: dict[str, dict], *, nvml_module: Any = None,
                  rapl_root: str | os.PathLike = rapl_mod.DEFAULT_ROOT, run_id: str | None = None,
                  in_workflow: bool = False) -> dict[str, Any]:
    """Read the counters as the run's end, reconcile, write ``summary/reconciliation.{json,md}``; return the record.

    The run is ``$DISTILL_BENCH_RUN_ID`` (set by the Snakefile's onstart in the jobs it spawns); without it, a
    hand-run ``distill-bench rollup`` re-reconciles the newest finished run from its saved end snapshot, while the
    workflow's own roll-up (``in_workflow``) says the start is unknown rather than borrow another run's.
    """
    results_dir = Path(results_dir)
    summary = results_dir / "summary"
    run_id = run_id or os.environ.get(run_counters.RUN_ID_ENV)
    folder = None
    if run_id:
        folder = run_counters.runs_dir(results_dir) / run_id
        start = run_counters.load_json(folder / "start.json")
        if start is None:
            record = {"status": "no_run_snapshot", "run_id": run_id,
                      "reason": f"{folder / 'start.json'} missing or unreadable: the run's start counters are unknown"}
            write(record, summary)
            return record
        end = {"run_id": run_id, **run_counters.read_counters(nvml_module, rapl_root)}
        from distill_bench.energy import atomic_write_json

        atomic_write_json(folder / "end.json", end)
    elif in_workflow:
        record = {"status": "no_run_snapshot", "run_id": None,
                  "reason": f"${run_counters.RUN_ID_ENV} is not set: the Snakefile's onstart did not run "
                            "(--no-hooks?), so the run's start counters are unknown"}
        write(record, summary)
        return record
    else:
        run_id = run_counters.latest_finished_run(results_dir)
        if run_id is None:
            record = {"status": "no_run_snapshot", "run_id": None,
                      "reason": "no run start snapshot (the roll-up ran outside a workflow run and no earlier run "
                                "finished); device totals unknown"}
            write(record, summary)
            return record
        folder = run_counters.runs_dir(results_dir) / run_id
        start = run_counters.load_json(folder / "start.json")
        end = run_counters.load_json(folder / "end.json")
    watch = run_counters.load_json(folder / "rapl_watch.json")
    record = reconcile(start, end, stages, watch)
    if watch and (start.get("rapl") or {}).get("available"):
        stale = run_counters.seconds_between(watch["time"], end["time"])
        if stale > 5 * float(watch.get("interval_s") or run_counters.RAPL_WATCH_INTERVAL_S):
            for entry in record["devices"]:
                if entry["device"].startswith("rapl:"):
                    entry.setdefault("notes", []).append(
                        f"RAPL watch last polled {stale:.0f} s before the end: wraps in that stretch beyond one "
                        "are not resolved")
    write(record, summary, folder)
    return record



def mark_shared_rows(comparison, charged: dict[str, list[str]], shared: set[str], accept_shared: bool):
    """Add ``shared_device`` (the row's bill includes a stage charged a shared device's energy); unless the config
    accepts shared devices, such rows -- and rows whose sft_gt baseline is one -- lose their N*, and
    ``comparable`` (read by the Pareto frontier and any verdict) is False."""
    frame = comparison.copy()
    frame["shared_device"] = [bool(shared & set(charged.get(exp, []))) for exp in frame["experiment"]]
    frame["comparable"] = True
    if accept_shared or frame.empty:
        return frame
    for i, row in frame.iterrows():
        base = frame[(frame.pipeline == "sft_gt") & (frame.student == row["student"])
                     & (frame.dataset == row["dataset"])]
        if row["shared_device"] or (len(base) and bool(base.iloc[0]["shared_device"])):
            frame.at[i, "comparable"] = False
            frame.at[i, "break_even_reuse"] = None
    return frame


def comparison_notes(comparison, record: dict[str, Any], accept_shared: bool) -> str:
    """The lines comparison.md carries about the reconciliation and about rows charged a shared device."""
    lines = ["", summary_line(record) + " Details: reconciliation.md."]
    if "shared_device" in comparison and comparison["shared_device"].any():
        rows = ", ".join(comparison.loc[comparison["shared_device"], "experiment"])
        if accept_shared:
            lines += ["", f"Note: shared device accepted (energy.accept_shared_devices): {rows} were charged energy "
                          "of a device other stages used at the same time; their energy figures overcount."]
        else:
            lines += ["", f"Note: shared device: {rows} were charged energy of a device other stages used at the "
                          "same time; they are kept out of N*, the Pareto frontier and verdicts "
                          "(energy.accept_shared_devices: false)."]
    return "\n".join(lines) + "\n"
