"""Figures of the roll-up: Pareto frontier (energy vs quality), energy by role, the run timeline."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PIPELINE_COLORS = {"sft_gt": "#4C72B0", "kd": "#DD8452", "sft": "#55A868", "dpo": "#C44E52",
                   "selfdistill": "#8172B3", "continued": "#937860"}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with less (or equal) energy and higher (or equal) quality."""
    front, best = [], -math.inf
    for energy, quality in sorted(points, key=lambda p: (p[0], -p[1])):
        if quality > best:
            front.append((energy, quality))
            best = quality
    return front


def _atomic_savefig(fig, path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_pareto(comparison: pd.DataFrame, out: Path, size_labels: dict[str, str] | None = None,
                energy_column: str = "total_kwh_oneoff", by_seed: pd.DataFrame | None = None) -> Path:
    """One point per experiment at its mean over seeds: vertical bar = the two-level bootstrap CI (seeds and eval
    items), horizontal bar = ± one sd of the energy over seeds; small dots = the individual seeds."""
    size_labels = size_labels or {}
    frame = comparison.copy()
    frame["size"] = frame["student"].map(lambda s: size_labels.get(s) or s)
    sizes = sorted(frame["size"].unique())
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(6.4 * max(1, len(sizes)), 4.8), squeeze=False)
    frontier_drawn = False
    for ax, size in zip(axes[0], sizes):
        sub = frame[frame["size"] == size]
        for _, r in sub.iterrows():
            color = PIPELINE_COLORS.get(r.pipeline, "grey")
            wh = 1000 * r[energy_column]
            acc = 100 * r.flexible_acc
            yerr = [[100 * (r.flexible_acc - r.flexible_ci_low)], [100 * (r.flexible_ci_high - r.flexible_acc)]]
            comparable = bool(r.get("comparable", True))
            xerr = None
            if energy_column == "total_kwh_oneoff" and "total_kwh_oneoff_sd" in r and r.total_kwh_oneoff_sd == \
                    r.total_kwh_oneoff_sd:
                xerr = [[1000 * r.total_kwh_oneoff_sd], [1000 * r.total_kwh_oneoff_sd]]
            ax.errorbar([wh], [acc], yerr=yerr, xerr=xerr, fmt="o" if comparable else "x", color=color, capsize=3,
                        ms=7)
            if by_seed is not None and "group" in by_seed:
                runs = by_seed[(by_seed.group == r.experiment) & (by_seed.missing.fillna("") == "")]
                ax.plot(1000 * runs[energy_column], 100 * runs.flexible_acc, ".", color=color, alpha=0.5, ms=4)
            if r.pipeline != "sft_gt" and energy_column == "total_kwh_oneoff":
                ax.plot([1000 * r.total_kwh_amortised], [acc], marker="o", mfc="none", color=color, ms=7)
                ax.annotate("", xy=(1000 * r.total_kwh_amortised, acc), xytext=(wh, acc),
                            arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.5})
            name = r.experiment.split(".", 3)[-1] if r.variant != "{}" else r.pipeline
            ax.annotate(name if comparable else f"{name} (shared device: off the frontier)", (wh, acc),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
        eligible = sub[sub["comparable"].astype(bool)] if "comparable" in sub else sub   # shared-device rows stay off
        front = pareto_front([(1000 * e, 100 * q) for e, q in zip(eligible[energy_column], eligible.flexible_acc)
                              if not (math.isnan(e) or math.isnan(q))])
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="black", alpha=0.4, label="Pareto frontier")
            frontier_drawn = True
        ax.set_title(f"student {size}")
        ax.set_xlabel("energy per student, Wh (filled: one-off, hollow: amortised)")
        ax.set_ylabel("exact match (flexible), %\nmean over seeds; bars: CI over seeds and items; dots: seeds",
                      fontsize=9)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=p) for p, c in PIPELINE_COLORS.items()
               if p in set(frame.pipeline)]
    if frontier_drawn:
        handles.append(plt.Line2D([], [], ls="--", color="black", alpha=0.4, label="Pareto frontier"))
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.suptitle("Energy vs quality (upper left is better)")
    _atomic_savefig(fig, out)
    return out


def plot_energy_by_role(comparison: pd.DataFrame, out: Path) -> Path:
    frame = comparison.sort_values(["pipeline", "experiment"])
    labels = list(frame.experiment)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(labels)), 4.8))
    bottom = [0.0] * len(labels)
    parts = [("teacher_kwh_amortised", "teacher side (amortised)", "#DD8452"),
             ("upstream_kwh_amortised", "upstream checkpoint (amortised)", "#8172B3"),
             ("student_train_kwh", "student training", "#4C72B0"), ("eval_kwh", "evaluation", "#55A868")]
    for column, name, color in parts:
        values = [1000 * v for v in frame[column]]
        ax.bar(labels, values, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    oneoff_extra = [1000 * (o - a + uo - ua) for o, a, uo, ua in zip(
        frame.teacher_kwh_oneoff, frame.teacher_kwh_amortised, frame.upstream_kwh_oneoff, frame.upstream_kwh_amortised)]
    ax.bar(labels, oneoff_extra, bottom=bottom, label="one-off surcharge (shared costs paid in full)", color="#DD8452",
           alpha=0.35, hatch="//")
    ax.set_ylabel("energy, Wh")
    ax.set_title("Energy by role per experiment")
    ax.tick_params(axis="x", rotation=30)
    for tick in ax.get_xticklabels():
        tick.set_ha("right")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)   # never over a bar
    ax.grid(axis="y", alpha=0.3)
    _atomic_savefig(fig, out)
    return out


ROLE_COLORS = {"setup": "#8C8C8C", "data": "#937860", "teacher": "#DD8452", "student": "#4C72B0",
               "eval": "#55A868", "idle": "#CCB974"}


def _stage_attempts(stages: pd.DataFrame) -> list[dict]:
    """Every attempt of every stage with its wall-clock window, energy and timeline samples."""
    import json

    from distill_bench.energy.run_counters import parse_time

    out = []
    for _, row in stages.iterrows():
        if not isinstance(row.get("path"), str) or not Path(row.path).exists():
            continue
        with open(row.path) as fh:
            stage = json.load(fh)
        timeline = read_timeline(Path(row.path), keep_attempt=True)
        for number, attempt in enumerate(stage.get("attempts") or [], start=1):
            n = int(attempt.get("attempt") or number)
            samples = None
            if timeline is not None and not timeline.empty:
                samples = timeline[timeline["attempt"] == n] if "attempt" in timeline else timeline
            out.append({"stage_id": stage["stage_id"], "role": stage.get("role"), "attempt": n,
                        "start": parse_time(attempt["start_time"]), "end": parse_time(attempt["end_time"]),
                        "total_j": float((attempt.get("energy") or {}).get("total_j") or 0.0),
                        "status": attempt.get("status"), "samples": samples})
    return out


def read_timeline(stage_json: Path, keep_attempt: bool = False) -> pd.DataFrame | None:
    """The meter's timeline of one stage: t_s since its attempt's start, GPU power (W) per device and summed, and
    process CPU utilisation (%)."""
    import json

    with open(stage_json) as fh:
        stage = json.load(fh)
    ref = (stage.get("power") or {}).get("timeline")
    if not ref:
        return None
    path = Path(ref) if Path(ref).is_absolute() else stage_json.parent / Path(ref).name
    if not path.exists() or path.stat().st_size == 0:
        return None
    frame = pd.read_csv(path)
    power_cols = [c for c in frame.columns if c.endswith("_power_w")]
    out = pd.DataFrame({"t_s": frame["t_s"]})
    if keep_attempt and "attempt" in frame:
        out["attempt"] = frame["attempt"]
    for column in power_cols:
        out[column] = frame[column]
    out["gpu_w"] = frame[power_cols].sum(axis=1, min_count=1) if power_cols else float("nan")
    out["cpu_pct"] = frame["proc_cpu_pct"] if "proc_cpu_pct" in frame else float("nan")
    return out


def _uncovered(windows: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    out, cursor = [], lo
    for a, b in sorted(windows):
        if a > cursor:
            out.append((cursor, a))
        cursor = max(cursor, b)
    if hi > cursor:
        out.append((cursor, hi))
    return out


def unattributed_caption(device: dict) -> tuple[str, float | None]:
    """The power panel's line about one device's unattributed energy, and the mean power to draw over the time no
    stage covered it -- None when the stages were charged more than the counter saw (stages shared the device), where
    an 'unattributed' power would be negative and meaningless."""
    joules, seconds = device["unattributed_j"], device["unattributed_s"]
    if joules < 0:
        return (f"{device['device']}: the stages were charged {-joules / 3600:.3g} Wh more than the device's counter "
                "saw over the run (stages shared it: reconciliation.md names them)"), None
    mean_w = joules / seconds
    return (f"{device['device']}: unattributed {joules / 3600:.3g} Wh over {seconds:.0f} s = {mean_w:.0f} W mean while "
            "no stage used it (dashed; counter over the run)"), mean_w


def plot_run_timeline(stages: pd.DataFrame, out: Path, reconciliation: dict | None = None) -> Path:
    """The run on the wall clock: one bar per stage attempt (row per stage, colour by role, Wh label), the device
    power underneath (GPU power per device, else the stages' summed process CPU utilisation), the stretches no stage
    covered shaded. Only attempts of this run are drawn when the reconciliation knows the run's window."""
    import matplotlib.patches as mpatches

    from distill_bench.energy.run_counters import parse_time

    attempts = _stage_attempts(stages)
    rec = reconciliation or {}
    if rec.get("start_time") and rec.get("end_time"):
        t0, t1 = parse_time(rec["start_time"]), parse_time(rec["end_time"])
        attempts = [a for a in attempts if a["start"] >= t0 and a["end"] <= t1]
    elif attempts:
        t0, t1 = min(a["start"] for a in attempts), max(a["end"] for a in attempts)
    else:
        t0 = t1 = None
    order = []
    for a in sorted(attempts, key=lambda a: a["start"]):
        if a["stage_id"] not in order:
            order.append(a["stage_id"])
    n_rows = max(1, len(order))
    fig, (ax, axp) = plt.subplots(2, 1, figsize=(12, 2.2 + 0.24 * n_rows + 2.6), sharex=True,
                                  gridspec_kw={"height_ratios": [0.24 * n_rows + 0.8, 2.4], "hspace": 0.06})
    span = (t1 - t0).total_seconds() if t0 is not None else 1.0
    def rel(t):
        return (t - t0).total_seconds()

    windows = []
    for a in attempts:
        y = order.index(a["stage_id"])
        x0, width = rel(a["start"]), max((a["end"] - a["start"]).total_seconds(), span * 1e-3)
        windows.append((x0, x0 + width))
        ax.broken_barh([(x0, width)], (y - 0.4, 0.8), color=ROLE_COLORS.get(a["role"], "grey"),
                       hatch="//" if a["status"] != "complete" else None, edgecolor="black", linewidth=0.3)
        ax.text(x0 + width + span * 0.004, y, f"{a['total_j'] / 3600:.3g} Wh", va="center", fontsize=6)
    gaps = _uncovered(windows, 0.0, span) if t0 is not None else []
    for axis in (ax, axp):
        for a, b in gaps:
            if b - a > span * 0.002:
                axis.axvspan(a, b, color="#F4B6B6", alpha=0.35, lw=0)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order, fontsize=6)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    gap_s = sum(b - a for a, b in gaps)
    ax.set_title(f"Run timeline: {len(attempts)} stage attempt(s) in {span:.0f} s, no stage running for "
                 f"{gap_s:.0f} s (shaded)", fontsize=10)
    handles = [mpatches.Patch(color=c, label=r) for r, c in ROLE_COLORS.items() if r in {a["role"] for a in attempts}]
    handles.append(mpatches.Patch(color="#F4B6B6", alpha=0.35, label="no stage running (unattributed)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)

    gpu_columns = sorted({c for a in attempts if a["samples"] is not None for c in a["samples"].columns
                          if c.startswith("gpu") and c.endswith("_power_w")})
    # CPU-only stages of a GPU run (no lease, CUDA_VISIBLE_DEVICES empty) carry no GPU columns at all
    has_gpu = any(a["samples"] is not None
                  and a["samples"][[c for c in gpu_columns if c in a["samples"]]].notna().any().any()
                  for a in attempts)
    if has_gpu:
        for column in gpu_columns:
            parts = []
            for a in attempts:
                if a["samples"] is None or column not in a["samples"]:
                    continue
                part = a["samples"][["t_s", column]].dropna()
                parts.append(pd.DataFrame({"x": part["t_s"] + rel(a["start"]), "y": part[column]}))
                parts.append(pd.DataFrame({"x": [rel(a["end"])], "y": [float("nan")]}))   # break between stages
            if parts:
                series = pd.concat(parts).sort_values("x", kind="stable")
                axp.plot(series["x"], series["y"], lw=0.8, label=column.replace("_power_w", ""))
        axp.set_ylabel("GPU power, W")
        unattributed = [d for d in rec.get("devices") or [] if d.get("kind") == "gpu" and d.get("unattributed_s")
                        and d.get("unattributed_j") is not None]
        for i, d in enumerate(unattributed):
            caption, mean_w = unattributed_caption(d)
            if mean_w is not None:
                # the counter's energy no stage was charged, spread over the time no stage covered that device
                on_device = [(rel(parse_time(w["start"])), rel(parse_time(w["end"]))) for w in d.get("stages") or []]
                for a, b in _uncovered(on_device, 0.0, span):
                    axp.plot([a, b], [mean_w, mean_w], ls="--", color="#C44E52", lw=1)
            axp.text(0.99, 0.04 + 0.08 * i, caption, transform=axp.transAxes, fontsize=7, ha="right", va="bottom")
        axp.set_ylim(bottom=0)
    else:
        step = max(1.0, span / 400)
        bins: dict[int, float] = {}
        for a in attempts:
            if a["samples"] is None:
                continue
            part = a["samples"][["t_s", "cpu_pct"]].dropna()
            if part.empty:
                continue
            binned = ((part["t_s"] + rel(a["start"])) // step).astype(int)
            for b, v in part.groupby(binned)["cpu_pct"].mean().items():
                bins[b] = bins.get(b, 0.0) + float(v)
        if bins:
            grid = range(0, int(span // step) + 1)
            axp.fill_between([g * step for g in grid], [bins.get(g, 0.0) for g in grid], step="post",
                             color="#4C72B0", alpha=0.6, lw=0)
        axp.set_ylabel("CPU utilisation of the\nstages' processes, %")
        axp.text(0.01, 0.95, "no GPU in this run: CPU utilisation shown, energy figures are estimates",
                 transform=axp.transAxes, fontsize=7, va="top")
    axp.set_xlabel("seconds since the run started" if rec.get("start_time") else "seconds since the first stage")
    axp.grid(alpha=0.3)
    if has_gpu:
        axp.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    axp.set_xlim(0, span * 1.06)
    _atomic_savefig(fig, out)
    return out
