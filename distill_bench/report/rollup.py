"""Roll stage JSONs and eval results up into the comparison table.

Accounting rules (README "Reading the table"):
- every stage belongs to exactly one bucket: setup (shown, never charged), data, teacher side (a shared artifact),
  student training, eval, idle;
- a shared teacher artifact (logit cache, synthetic set, preference pairs) and an upstream checkpoint (the SFT model
  DPO starts from, the student self-distillation learns from) are charged **one-off** (their full energy to each
  consumer, what a single study pays) and **amortised** (every stage split evenly across the experiments whose bill
  contains it, so the amortised column sums back to the measured total);
- N* (break-even reuse) is the smallest number of students sharing the teacher artifact for which the pipeline's
  per-student energy T/N + S is at most the plain-SFT baseline's B, given its quality is at least the baseline's:
  N* = ceil(T / (B - S)) when B > S, else never. T = teacher side + upstream (shareable), S = own training + eval.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

J_PER_KWH = 3.6e6

COMPARISON_COLUMNS = [
    "experiment", "pipeline", "student", "dataset", "variant", "lineage", "artifact", "artifact_consumers",
    "strict_acc", "strict_ci_low", "strict_ci_high", "strict_stderr", "flexible_acc", "flexible_ci_low",
    "flexible_ci_high", "flexible_stderr", "eval_n", "eval_backend", "other_evals",
    "teacher_kwh_oneoff", "teacher_kwh_amortised", "upstream_kwh_oneoff", "upstream_kwh_amortised",
    "student_train_kwh", "eval_kwh",
    "total_kwh_oneoff", "total_kwh_amortised", "net_total_kwh_oneoff", "net_total_kwh_amortised",
    "kwh_per_quality_point", "break_even_reuse", "trained_tokens", "train_tokens_per_s", "train_j_per_token",
    "teacher_tokens", "co2_kg_oneoff", "duration_s_oneoff", "energy_sources", "status",
]

STAGE_COLUMNS = [
    "stage_id", "stage", "role", "pipeline", "experiment", "artifact", "status", "attempts", "start_time",
    "end_time", "duration_s", "gpu_j", "cpu_j", "ram_j", "total_j", "net_j", "idle_w", "total_kwh", "policy",
    "gpu_source", "cpu_source", "ram_source", "primary_tokens", "primary_token_count", "tokens_per_s",
    "j_per_token", "gpu_avg_w", "gpu_peak_w", "co2_kg", "tokens_json", "path",
]


class RollupError(RuntimeError):
    """The roll-up cannot produce honest numbers (a missing or invalid stage JSON); the message says which."""


# a stage JSON is final only once its meter stopped with every attempt accounted for
FINAL_STAGE_STATUS = "complete"


def _load_stage(path: Path) -> dict:
    from distill_bench.energy import load_stage_json

    try:
        stage = load_stage_json(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # unreadable, empty, schema errors, newer schema versions, hand-edited files
        raise RollupError(f"stage JSON {path}: {err}") from err
    if stage.get("status") != FINAL_STAGE_STATUS:
        raise RollupError(f"stage JSON {path}: status {stage.get('status')!r}, not {FINAL_STAGE_STATUS!r} (the stage "
                          f"is still running, failed or was interrupted); rerun it before rolling up")
    return stage


def load_eval_result(path: Path) -> dict:
    """A declared evaluation's result, refused (path and reason named) when unreadable, empty or unfinished."""
    try:
        result = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RollupError(f"eval result {path}: missing for a declared evaluation; rerun it rather than showing "
                          f"n/a") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RollupError(f"eval result {path}: unreadable ({err})") from None
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict) or not result["metrics"]:
        raise RollupError(f"eval result {path}: holds no metrics (empty or truncated file); rerun the evaluation")
    status = result.get("status", FINAL_STAGE_STATUS)
    if status != FINAL_STAGE_STATUS:
        raise RollupError(f"eval result {path}: status {status!r}, not {FINAL_STAGE_STATUS!r}; rerun the evaluation")
    return result


def load_stages(results_dir: str | Path, stage_ids: list[str]) -> dict[str, dict]:
    energy_dir = Path(results_dir) / "energy"
    stages, missing = {}, []
    for stage_id in stage_ids:
        path = energy_dir / f"{stage_id}.json"
        if not path.exists():
            missing.append(stage_id)
            continue
        stage = _load_stage(path)
        stage["_path"] = str(path)
        stages[stage_id] = stage
    if missing:
        raise RollupError(f"missing stage JSON for declared stage(s): {', '.join(missing)} (expected under "
                          f"{energy_dir}/); rerun those stages rather than reading them as zero")
    return stages


def _energy(stage: dict, key: str = "total_j") -> float:
    value = (stage.get("energy") or {}).get(key)
    return float(value) if value is not None else math.nan


def flatten_stage(stage: dict) -> dict:
    energy = stage.get("energy") or {}
    sources = energy.get("sources") or {}
    tokens = stage.get("tokens") or {}
    primary = tokens.get("primary")
    counts = tokens.get("counts") or {}
    throughput = stage.get("throughput") or {}
    power = stage.get("power") or {}
    return {
        "stage_id": stage.get("stage_id"), "stage": stage.get("stage"), "role": stage.get("role"),
        "pipeline": stage.get("pipeline"), "experiment": stage.get("experiment"), "artifact": stage.get("artifact"),
        "status": stage.get("status"), "attempts": len(stage.get("attempts") or []),
        "start_time": stage.get("start_time"), "end_time": stage.get("end_time"),
        "duration_s": stage.get("duration_s"), "gpu_j": energy.get("gpu_j"), "cpu_j": energy.get("cpu_j"),
        "ram_j": energy.get("ram_j"), "total_j": energy.get("total_j"), "net_j": energy.get("net_j"),
        "idle_w": energy.get("idle_w"), "total_kwh": energy.get("total_kwh"), "policy": energy.get("policy"),
        "gpu_source": sources.get("gpu"), "cpu_source": sources.get("cpu"), "ram_source": sources.get("ram"),
        "primary_tokens": primary, "primary_token_count": counts.get(primary) if primary else None,
        "tokens_per_s": throughput.get("tokens_per_s"), "j_per_token": throughput.get("j_per_token"),
        "gpu_avg_w": power.get("gpu_avg_w"), "gpu_peak_w": power.get("gpu_peak_w"), "co2_kg": stage.get("co2_kg"),
        "tokens_json": json.dumps(counts, sort_keys=True), "path": stage.get("_path"),
    }


def stages_frame(stages: dict[str, dict]) -> pd.DataFrame:
    rows = [flatten_stage(s) for s in stages.values()]
    return pd.DataFrame(rows, columns=STAGE_COLUMNS)


def break_even_reuse(teacher_j: float, student_j: float, baseline_j: float, quality: float | None,
                     baseline_quality: float | None) -> float | None:
    """N* = smallest N with teacher_j/N + student_j <= baseline_j, if quality >= baseline_quality.

    Returns an int-valued float, ``math.inf`` for never, or None when the baseline is unknown.
    """
    if baseline_j is None or math.isnan(baseline_j):
        return None
    if quality is not None and baseline_quality is not None and quality < baseline_quality:
        return math.inf
    if teacher_j <= 0:
        return 1.0 if student_j <= baseline_j else math.inf
    margin = baseline_j - student_j
    if margin <= 0:
        return math.inf
    return float(max(1, math.ceil(teacher_j / margin - 1e-12)))


def _eval_result(results_dir: Path, model_id: str, dataset: str) -> dict:
    return load_eval_result(results_dir / "eval" / model_id / f"{dataset}.json")


def _metric(result: dict | None, name: str) -> tuple[float, float, float, float]:
    """(value, ci_low, ci_high, stderr) of one metric of an eval result."""
    if not result:
        return (math.nan, math.nan, math.nan, math.nan)
    m = (result.get("metrics") or {}).get(name) or {}
    return (m.get("value", math.nan), m.get("ci_low", math.nan), m.get("ci_high", math.nan),
            m.get("stderr", math.nan))


def _other_evals(results_dir: Path, plan: dict, model_id: str, primary: str) -> str:
    """Scores of a model's other evaluations (lm-eval tasks such as gsm8k, mmlu, ifeval), as compact JSON."""
    out = {}
    for m, name in plan["eval_units"]:
        if m != model_id or name == primary:
            continue
        result = _eval_result(results_dir, m, name) or {}
        out[name] = {"backend": result.get("backend"), "n": result.get("n"),
                     **{k: {"value": v.get("value"), "stderr": v.get("stderr")}
                        for k, v in (result.get("metrics") or {}).items()}}
    return json.dumps(out, sort_keys=True) if out else ""


def charged_units(plan: dict, exp_id: str) -> dict[str, list[str]]:
    """The stages an experiment's bill is made of, by bucket.

    teacher: the stages of the shared teacher artifacts it consumes (a KD student: the cache and its tau's tail), and
    of those its upstream checkpoints consumed;
    upstream: the training stages of the earlier experiments it builds on (DPO's SFT start, self-distillation's
    teacher, the checkpoint continued training continues); student: its own training; eval: its own evaluations.
    """
    exps, arts = plan["experiments"], plan["artifacts"]
    exp = exps[exp_id]
    teacher: list[str] = []
    upstream: list[str] = []
    for owner in [exp_id] + list(exp.get("lineage") or []):
        for art_id in (exps[owner].get("artifact"), exps[owner].get("tail_artifact")):
            if art_id:
                teacher += [s for s in arts[art_id]["stage_ids"] if s not in teacher]
        if owner != exp_id:
            upstream.append(f"student.train.{owner}")
    evals = [f"eval.{m}.{d}" for m, d in plan["eval_units"] if m == exp_id]
    student = [s for s in (f"student.reference.{exp_id}", f"student.train.{exp_id}") if s in plan["stage_ids"]]
    return {"teacher": teacher, "upstream": upstream, "student": student, "eval": evals}


def unit_consumers(plan: dict) -> dict[str, int]:
    """How many experiments' bills contain each stage: the divisor of the amortised charge."""
    counts: dict[str, int] = {}
    for exp_id in plan["experiments"]:
        for stage_ids in charged_units(plan, exp_id).values():
            for stage_id in stage_ids:
                counts[stage_id] = counts.get(stage_id, 0) + 1
    return counts


def _lineage(plan: dict, exp_id: str) -> str:
    chain = list(reversed(plan["experiments"][exp_id].get("lineage") or []))
    return " -> ".join(chain + [exp_id])


def comparison_frame(plan: dict, stages: dict[str, dict], results_dir: str | Path) -> pd.DataFrame:
    results_dir = Path(results_dir)
    n_consumers = unit_consumers(plan)
    rows = []
    for exp_id, exp in plan["experiments"].items():
        units = charged_units(plan, exp_id)
        gross = {b: sum(_energy(stages[s]) for s in ids) for b, ids in units.items()}
        net = {b: sum(_energy(stages[s], "net_j") for s in ids) for b, ids in units.items()}
        share = {b: sum(_energy(stages[s]) / n_consumers[s] for s in ids) for b, ids in units.items()}
        share_net = {b: sum(_energy(stages[s], "net_j") / n_consumers[s] for s in ids) for b, ids in units.items()}
        train = stages[f"student.train.{exp_id}"]
        teacher_stages = [stages[s] for s in units["teacher"]]
        all_stages = [stages[s] for ids in units.values() for s in ids]
        result = _eval_result(results_dir, exp_id, exp["dataset"])
        strict, flexible = _metric(result, "strict_match"), _metric(result, "flexible_extract")
        art_id = exp.get("artifact")
        total_oneoff = sum(gross.values())
        train_tokens = ((train.get("tokens") or {}).get("counts") or {}).get("trained_tokens")
        teacher_tokens = sum(((s.get("tokens") or {}).get("counts") or {}).get(
            (s.get("tokens") or {}).get("primary") or "", 0) for s in teacher_stages)
        sources = sorted({f"{k}={v}" for s in all_stages
                          for k, v in ((s.get("energy") or {}).get("sources") or {}).items()})
        statuses = sorted({str(s.get("status")) for s in all_stages})
        rows.append({
            "experiment": exp_id, "pipeline": exp["pipeline"], "student": exp["student"], "dataset": exp["dataset"],
            "variant": json.dumps(exp.get("variant") or {}, sort_keys=True), "lineage": _lineage(plan, exp_id),
            "artifact": art_id,
            "artifact_consumers": len(plan["artifacts"][art_id]["consumers"]) if art_id else 0,
            "strict_acc": strict[0], "strict_ci_low": strict[1], "strict_ci_high": strict[2],
            "strict_stderr": strict[3], "flexible_acc": flexible[0], "flexible_ci_low": flexible[1],
            "flexible_ci_high": flexible[2], "flexible_stderr": flexible[3],
            "eval_n": (result or {}).get("n"), "eval_backend": (result or {}).get("backend"),
            "other_evals": _other_evals(results_dir, plan, exp_id, exp["dataset"]),
            "teacher_kwh_oneoff": gross["teacher"] / J_PER_KWH, "teacher_kwh_amortised": share["teacher"] / J_PER_KWH,
            "upstream_kwh_oneoff": gross["upstream"] / J_PER_KWH,
            "upstream_kwh_amortised": share["upstream"] / J_PER_KWH,
            "student_train_kwh": gross["student"] / J_PER_KWH, "eval_kwh": gross["eval"] / J_PER_KWH,
            "total_kwh_oneoff": total_oneoff / J_PER_KWH,
            "total_kwh_amortised": sum(share.values()) / J_PER_KWH,
            "net_total_kwh_oneoff": sum(net.values()) / J_PER_KWH,
            "net_total_kwh_amortised": sum(share_net.values()) / J_PER_KWH,
            "kwh_per_quality_point": (total_oneoff / J_PER_KWH) / (flexible[0] * 100)
            if flexible[0] and flexible[0] > 0 else math.inf,
            "break_even_reuse": None,
            "trained_tokens": train_tokens,
            "train_tokens_per_s": (train.get("throughput") or {}).get("tokens_per_s"),
            "train_j_per_token": (train.get("throughput") or {}).get("j_per_token"),
            "teacher_tokens": teacher_tokens,
            "co2_kg_oneoff": sum((s.get("co2_kg") or 0.0) for s in all_stages),
            "duration_s_oneoff": sum((s.get("duration_s") or 0.0) for s in all_stages),
            "energy_sources": ";".join(sources), "status": ",".join(statuses),
            "_shared_j": gross["teacher"] + gross["upstream"], "_own_j": gross["student"] + gross["eval"],
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    for i, row in frame.iterrows():
        if row["pipeline"] == "sft_gt":
            continue
        base = frame[(frame.pipeline == "sft_gt") & (frame.student == row["student"])
                     & (frame.dataset == row["dataset"])]
        if base.empty:
            continue
        b = base.iloc[0]
        frame.at[i, "break_even_reuse"] = break_even_reuse(
            row["_shared_j"], row["_own_j"], b["_own_j"] + b["_shared_j"], row["flexible_acc"], b["flexible_acc"])
    return frame[COMPARISON_COLUMNS]


def reference_rows(plan: dict, results_dir: str | Path) -> pd.DataFrame:
    """Quality of the teacher and the untrained students: the ceiling and the floor of every comparison."""
    results_dir = Path(results_dir)
    rows = []
    for model_id, dataset in plan["eval_units"]:
        if model_id in plan["experiments"]:
            continue
        result = _eval_result(results_dir, model_id, dataset)
        strict, flexible = _metric(result, "strict_match"), _metric(result, "flexible_extract")
        rows.append({"model": model_id, "dataset": dataset, "strict_acc": strict[0], "strict_ci_low": strict[1],
                     "strict_ci_high": strict[2], "strict_stderr": strict[3], "flexible_acc": flexible[0],
                     "flexible_ci_low": flexible[1], "flexible_ci_high": flexible[2], "flexible_stderr": flexible[3],
                     "eval_n": (result or {}).get("n"), "eval_backend": (result or {}).get("backend")})
    return pd.DataFrame(rows)


def _fmt_n_star(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == math.inf:
        return "never"
    return str(int(value))


def _pct(v: float, lo: float, hi: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_table(comparison: pd.DataFrame, references: pd.DataFrame, stages: pd.DataFrame) -> str:
    lines = ["# distill-bench comparison", "",
             "Energy in Wh (1 Wh = 3600 J). Quality: exact match in %, 95 % bootstrap CI in brackets. "
             "Teacher side one-off = full cost of the shared teacher artifact; amortised = split across its "
             "consumers in this run. N* = students that must share the teacher artifact before the pipeline beats "
             "plain SFT (sft_gt) on energy at equal or better quality.", "",
             "| experiment | pipeline | strict EM | flexible EM | scored by | teacher Wh (one-off / amortised) | upstream Wh | "
             "train Wh | eval Wh | total Wh (one-off / amortised) | net Wh (one-off) | trained tokens | train tok/s "
             "| N* |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in comparison.iterrows():
        lines.append(
            f"| {r.experiment} | {r.pipeline} | {_pct(r.strict_acc, r.strict_ci_low, r.strict_ci_high)} | "
            f"{_pct(r.flexible_acc, r.flexible_ci_low, r.flexible_ci_high)} | {r.eval_backend} | "
            f"{1000 * r.teacher_kwh_oneoff:.3f} / {1000 * r.teacher_kwh_amortised:.3f} | "
            f"{1000 * r.upstream_kwh_oneoff:.3f} | {1000 * r.student_train_kwh:.3f} | {1000 * r.eval_kwh:.3f} | "
            f"{1000 * r.total_kwh_oneoff:.3f} / {1000 * r.total_kwh_amortised:.3f} | "
            f"{1000 * r.net_total_kwh_oneoff:.3f} | {r.trained_tokens} | "
            f"{(r.train_tokens_per_s or 0):.0f} | {_fmt_n_star(r.break_even_reuse)} |")
    others = comparison[comparison.other_evals.fillna("") != ""]
    if len(others):
        lines += ["", "Other evaluations (value ± stderr):", ""]
        for _, r in others.iterrows():
            scores = json.loads(r.other_evals)
            parts = [f"{task} {name} {100 * m['value']:.1f} ± {100 * (m['stderr'] or 0):.1f}"
                     for task, result in scores.items() for name, m in result.items()
                     if isinstance(m, dict) and m.get("value") is not None]
            lines.append(f"- {r.experiment}: " + "; ".join(parts))
    lineage = comparison[comparison.lineage != comparison.experiment]
    if len(lineage):
        lines += ["", "Lineage (upstream Wh = the training of the earlier checkpoints each row builds on):", ""]
        lines += [f"- {r.lineage}" for _, r in lineage.iterrows()]
    if not references.empty:
        lines += ["", "Reference models (not trained in this comparison):", "",
                  "| model | eval | strict EM | flexible EM | n | scored by |", "|---|---|---|---|---|---|"]
        for _, r in references.iterrows():
            lines.append(f"| {r.model} | {r.dataset} | {_pct(r.strict_acc, r.strict_ci_low, r.strict_ci_high)} | "
                         f"{_pct(r.flexible_acc, r.flexible_ci_low, r.flexible_ci_high)} | {r.eval_n} | "
                         f"{r.eval_backend} |")
    setup = stages[stages.role.isin(["setup", "data", "idle"])]
    if not setup.empty:
        lines += ["", "Setup and data stages (shown, not charged to any pipeline):", "",
                  "| stage | role | duration s | total Wh | sources |", "|---|---|---|---|---|"]
        for _, r in setup.iterrows():
            lines.append(f"| {r.stage_id} | {r.role} | {r.duration_s:.1f} | {(r.total_j or 0) / 3600:.3f} | "
                         f"gpu={r.gpu_source}, cpu={r.cpu_source}, ram={r.ram_source} |")
    short = stages[(stages.duration_s.fillna(0) < 60) & ~stages.role.isin(["idle"])]
    if len(short):
        lines += ["", f"Note: {len(short)} of {len(stages)} stages ran for less than 60 s; energy over such short "
                      "windows is noisy (counter granularity, idle drift)."]
    estimated = sorted({src for col in ("gpu_source", "cpu_source", "ram_source")
                        for src in stages[col].dropna() if str(src).startswith("estimated")})
    if estimated:
        lines += ["", "Estimated (not measured) components in these numbers: " + ", ".join(estimated) + "."]
    return "\n".join(lines) + "\n"


def rollup_run(results_dir: str | Path, print_table: bool = False, plots: bool = True,
               in_workflow: bool = False) -> pd.DataFrame:
    import yaml

    from distill_bench.energy import atomic_write_text
    from distill_bench.report import reconcile

    results_dir = Path(results_dir)
    with open(results_dir / "config" / "plan.json") as fh:
        plan = json.load(fh)
    config_path = results_dir / "config" / "merged_config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    accept_shared = bool(((config or {}).get("energy") or {}).get("accept_shared_devices", False))
    stages = load_stages(results_dir, plan["stage_ids"])
    for model_id, dataset in plan["eval_units"]:     # every declared evaluation, before any output is written
        _eval_result(results_dir, model_id, dataset)
    # the run's own counters against the stages' sum; fails (after writing reconciliation.md) on double counting
    record = reconcile.reconcile_run(results_dir, stages, in_workflow=in_workflow)
    reconcile.enforce(record, accept_shared)
    stage_frame = stages_frame(stages)
    charged = {exp: [s for ids in charged_units(plan, exp).values() for s in ids] for exp in plan["experiments"]}
    comparison = comparison_frame(plan, stages, results_dir)
    comparison = reconcile.mark_shared_rows(comparison, charged, reconcile.shared_stage_ids(stages, record),
                                            accept_shared)
    references = reference_rows(plan, results_dir)
    out = results_dir / "summary"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "stages.csv", stage_frame.to_csv(index=False))
    atomic_write_text(out / "comparison.csv", comparison.to_csv(index=False))
    atomic_write_text(out / "references.csv", references.to_csv(index=False))
    md = markdown_table(comparison, references, stage_frame) + reconcile.comparison_notes(comparison, record,
                                                                                          accept_shared)
    atomic_write_text(out / "comparison.md", md)
    from distill_bench.forecast import write_forecast_vs_measured   # the forecast's calibration check

    write_forecast_vs_measured(config, stages, out)
    if plots:
        from distill_bench.report.plots import plot_energy_by_role, plot_pareto, plot_run_timeline

        sizes = {name: spec.get("size_label") for name, spec in (config or {}).get("students", {}).items()}
        if not comparison.empty:
            plot_pareto(comparison, out / "pareto.png", size_labels=sizes)
            plot_energy_by_role(comparison, out / "energy_by_role.png")
        plot_run_timeline(stage_frame, out / "run_timeline.png", record)
    from distill_bench.report.html import write_html_summary

    notes = [line for line in md.splitlines() if line.startswith(("Note:", "Estimated", "Reconciliation"))]
    write_html_summary(out, (config or {}).get("run_name", results_dir.name), comparison, references, stage_frame,
                       notes)
    if print_table:
        print(md)
    return comparison
