"""Figures of the roll-up: Pareto frontier (energy vs quality), energy by role, power timelines."""
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
    for ax, size in zip(axes[0], sizes):
        sub = frame[frame["size"] == size]
        for _, r in sub.iterrows():
            color = PIPELINE_COLORS.get(r.pipeline, "grey")
            wh = 1000 * r[energy_column]
            acc = 100 * r.flexible_acc
            yerr = [[100 * (r.flexible_acc - r.flexible_ci_low)], [100 * (r.flexible_ci_high - r.flexible_acc)]]
            xerr = None
            if energy_column == "total_kwh_oneoff" and "total_kwh_oneoff_sd" in r and r.total_kwh_oneoff_sd == \
                    r.total_kwh_oneoff_sd:
                xerr = [[1000 * r.total_kwh_oneoff_sd], [1000 * r.total_kwh_oneoff_sd]]
            ax.errorbar([wh], [acc], yerr=yerr, xerr=xerr, fmt="o", color=color, capsize=3, ms=7)
            if by_seed is not None and "group" in by_seed:
                runs = by_seed[(by_seed.group == r.experiment) & (by_seed.missing.fillna("") == "")]
                ax.plot(1000 * runs[energy_column], 100 * runs.flexible_acc, ".", color=color, alpha=0.5, ms=4)
            if r.pipeline != "sft_gt" and energy_column == "total_kwh_oneoff":
                ax.plot([1000 * r.total_kwh_amortised], [acc], marker="o", mfc="none", color=color, ms=7)
                ax.annotate("", xy=(1000 * r.total_kwh_amortised, acc), xytext=(wh, acc),
                            arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.5})
            ax.annotate(r.experiment.split(".", 3)[-1] if r.variant != "{}" else r.pipeline, (wh, acc),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
        front = pareto_front([(1000 * e, 100 * q) for e, q in zip(sub[energy_column], sub.flexible_acc)
                              if not (math.isnan(e) or math.isnan(q))])
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="black", alpha=0.4, label="Pareto frontier")
        ax.set_title(f"student {size}")
        ax.set_xlabel("energy per student, Wh (filled: one-off, hollow: amortised)")
        ax.set_ylabel("exact match (flexible), % (mean over seeds, CI over seeds and items; dots: seeds)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=p) for p, c in PIPELINE_COLORS.items()
               if p in set(frame.pipeline)]
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
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _atomic_savefig(fig, out)
    return out


def read_timeline(stage_json: Path) -> pd.DataFrame | None:
    """The meter's power timeline of one stage: t_s, summed GPU power (W) and process CPU utilisation (%)."""
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
    out["gpu_w"] = frame[power_cols].sum(axis=1, min_count=1) if power_cols else float("nan")
    out["cpu_pct"] = frame["proc_cpu_pct"] if "proc_cpu_pct" in frame else float("nan")
    return out


def plot_power_timelines(stages: pd.DataFrame, out: Path) -> Path:
    """GPU power (or, without a GPU, process CPU utilisation) of every stage over its own time axis."""
    rows = [r for _, r in stages.iterrows() if isinstance(r.get("path"), str)]
    timelines = [(r.stage_id, read_timeline(Path(r.path))) for r in rows]
    timelines = [(sid, t) for sid, t in timelines if t is not None and not t.empty]
    has_gpu = any(t["gpu_w"].notna().any() for _, t in timelines)
    column = "gpu_w" if has_gpu else "cpu_pct"
    fig, ax = plt.subplots(figsize=(9, 4.8))
    plotted = 0
    for stage_id, timeline in timelines:
        series = timeline[["t_s", column]].dropna()
        if series.empty:
            continue
        ax.plot(series["t_s"], series[column], lw=1, label=stage_id)
        plotted += 1
    ax.set_xlabel("seconds since stage start")
    ax.set_ylabel("GPU power, W (all devices)" if has_gpu else "process CPU utilisation, % (no GPU in this run)")
    ax.set_title("Power timeline of each stage")
    if plotted <= 12:
        ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    _atomic_savefig(fig, out)
    return out
