"""Compare several runs (e.g. one config on H100 vs L40S, or two token budgets) in one table and one figure."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

KEY_COLUMNS = ["run", "experiment", "pipeline", "student", "dataset", "token_budget", "seeds", "strict_acc",
               "flexible_acc", "flexible_ci_low", "flexible_ci_high", "delta_vs_baseline", "verdict",
               "total_kwh_oneoff", "total_kwh_amortised", "net_total_kwh_oneoff", "student_train_kwh",
               "teacher_kwh_oneoff", "trained_tokens", "train_tokens_per_s", "break_even_reuse", "break_even_status",
               "device"]


def _run_label(run_dir: Path) -> str:
    cfg = run_dir / "config" / "merged_config.yaml"
    if cfg.exists():
        return (yaml.safe_load(cfg.read_text()) or {}).get("run_name") or run_dir.name
    return run_dir.name


def _device(run_dir: Path) -> str:
    import json

    env = run_dir / "env" / "environment.json"
    if not env.exists():
        return "unknown"
    data = json.loads(env.read_text())
    gpus = (data.get("gpus") or {}).get("devices") or []
    if gpus:
        names = sorted({g.get("name", "?") for g in gpus})
        return f"{len(gpus)}x " + "/".join(names)
    cpu = data.get("cpu") or {}
    return f"CPU {cpu.get('cpu_model', '?')} ({cpu.get('logical_cpus', '?')} threads)"


def compare_runs(runs: list[str], out_dir: str | Path, labels: list[str] | None = None) -> pd.DataFrame:
    from distill_bench.energy import atomic_write_text
    from distill_bench.report.plots import PIPELINE_COLORS, _atomic_savefig, plt

    frames = []
    for index, run in enumerate(runs):
        run_dir = Path(run)
        table = run_dir / "summary" / "comparison.csv"
        if not table.exists():
            raise FileNotFoundError(f"{run}: no summary/comparison.csv (run the workflow or `distill-bench rollup "
                                    f"{run}` first)")
        frame = pd.read_csv(table)
        frame.insert(0, "run", labels[index] if labels else _run_label(run_dir))
        cfg_path = run_dir / "config" / "merged_config.yaml"
        budget = None
        if cfg_path.exists():
            budget = (yaml.safe_load(cfg_path.read_text()) or {}).get("training", {}).get("token_budget")
        frame["token_budget"] = budget
        frame["device"] = _device(run_dir)
        frames.append(frame)
    joint = pd.concat(frames, ignore_index=True)
    if joint["run"].duplicated().any() and joint.groupby("run")["experiment"].apply(lambda s: s.duplicated().any()).any():
        raise ValueError("two runs share a label; pass --labels to tell them apart")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in KEY_COLUMNS if c in joint.columns]
    atomic_write_text(out / "comparison_of_runs.csv", joint[columns].to_csv(index=False))
    atomic_write_text(out / "comparison_of_runs.md", joint[columns].to_markdown(index=False)
                      if _has_tabulate() else joint[columns].to_string(index=False))

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osD^vP*X"
    for r_index, (run, sub) in enumerate(joint.groupby("run", sort=False)):
        for _, r in sub.iterrows():
            ax.errorbar([1000 * r.total_kwh_oneoff], [100 * r.flexible_acc],
                        yerr=[[100 * (r.flexible_acc - r.flexible_ci_low)], [100 * (r.flexible_ci_high - r.flexible_acc)]],
                        fmt=markers[r_index % len(markers)], color=PIPELINE_COLORS.get(r.pipeline, "grey"), capsize=3)
        ax.plot([], [], markers[r_index % len(markers)], color="black", label=f"run {run}")
    for pipeline in sorted(set(joint.pipeline)):
        ax.plot([], [], "s", color=PIPELINE_COLORS.get(pipeline, "grey"), label=pipeline)
    ax.set_xlabel("energy per student, one-off, Wh")
    ax.set_ylabel("exact match (flexible), % with 95 % CI")
    ax.set_title("Runs compared")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _atomic_savefig(fig, out / "comparison_of_runs.png")
    return joint[columns]


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
