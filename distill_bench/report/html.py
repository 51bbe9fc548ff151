"""A self-contained HTML summary of one run (table, figures, stages), readable without Snakemake or a server."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.8em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; max-width: 70em; }
"""

COMPARISON_VIEW = ["experiment", "pipeline", "seeds", "missing_seeds", "flexible_acc", "flexible_ci_low",
                   "flexible_ci_high", "strict_acc", "delta_vs_baseline", "delta_ci_low", "delta_ci_high", "p_value",
                   "verdict",
                   "teacher_kwh_oneoff", "teacher_kwh_amortised", "upstream_kwh_oneoff", "student_train_kwh",
                   "eval_kwh", "total_kwh_oneoff", "total_kwh_amortised", "net_total_kwh_oneoff",
                   "break_even_reuse", "break_even_status", "shared_device", "trained_tokens", "train_tokens_per_s"]
STAGES_VIEW = ["stage_id", "role", "status", "attempts", "duration_s", "gpu_j", "cpu_j", "ram_j", "total_j", "net_j",
               "gpu_source", "cpu_source", "primary_tokens", "primary_token_count", "tokens_per_s", "co2_kg"]


def _img(path: Path) -> str:
    if not path.exists():
        return f'<p class="note">({html.escape(path.name)} not produced)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame, columns: list[str], table_id: str) -> str:
    view = frame[[c for c in columns if c in frame.columns]].copy()
    for column in [c for c in view.columns if c.endswith("_kwh") or "_kwh_" in c]:   # Wh reads better here
        view[column] = view[column] * 1000
        view = view.rename(columns={column: column.replace("kwh", "wh")})
    return view.to_html(index=False, table_id=table_id, float_format=lambda v: f"{v:.4g}", na_rep="—",
                        border=0, escape=True)


def write_html_summary(summary_dir: str | Path, run_name: str, comparison: pd.DataFrame, references: pd.DataFrame,
                       stages: pd.DataFrame, notes: list[str]) -> Path:
    from distill_bench.energy import atomic_write_text

    summary_dir = Path(summary_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>distill-bench: {html.escape(run_name)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>distill-bench run <b>{html.escape(run_name)}</b></h1>",
             "<p class='note'>Energy in Wh; quality = exact match (fraction) with 95 % CI; one-off charges each "
             "student the full teacher-side cost, amortised splits it across the students of this run; "
             "break_even_reuse = N* (inf = never; break_even_status says why it is blank). Means over seeds; the CI "
             "resamples seeds and eval items. Sources of every component are in the stage table.</p>",
             "<h2>Comparison</h2>", _table(comparison, COMPARISON_VIEW, "comparison"),
             "<h2>Reference models</h2>", _table(references, list(references.columns), "references"),
             "<h2>Energy vs quality</h2>", _img(summary_dir / "pareto.png"),
             "<h2>Energy by role</h2>", _img(summary_dir / "energy_by_role.png"),
             "<h2>Run timeline</h2>", _img(summary_dir / "run_timeline.png"),
             "<h2>Stages</h2>", _table(stages, STAGES_VIEW, "stages")]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    out = summary_dir / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out
