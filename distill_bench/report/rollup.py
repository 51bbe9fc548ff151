"""Roll stage JSONs and eval results up into the comparison table.

Accounting rules (README "Reading the table"):
- every stage belongs to exactly one bucket: setup (shown, never charged), data, teacher side (a shared artifact),
  student training, eval, idle;
- a shared teacher artifact (logit cache, synthetic set, preference pairs) and an upstream checkpoint (the SFT model
  DPO starts from, the student self-distillation learns from) are charged **one-off** (their full energy to each
  consumer, what a single study pays) and **amortised** (every stage split evenly across the experiments whose bill
  contains it, so the amortised column sums back to the measured total);
- every student experiment runs once per seed (config `seeds`): comparison_by_seed.csv has one row per seeded run
  (its amortised column sums back to the measured total, checked here), comparison.csv one row per experiment with
  the mean over its seeds, a two-level bootstrap CI (seeds, then eval items), the per-seed values, and a paired
  comparison with the `sft_gt` baseline of the same student and dataset over matched seeds and eval items;
- N* (break-even reuse) is the smallest number of students sharing the teacher artifact for which the pipeline's
  per-student energy T/N + S is at most the plain-SFT baseline's B: N* = ceil(T / (B - S)) when B > S, else never
  (T = 0 and B > S gives 0). T = teacher side + upstream (shareable), S = own training + eval, means over seeds. It
  is a number only when the paired comparison shows the pipeline at least as good as the baseline at the configured
  confidence; otherwise break_even_status says which condition failed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill_bench.config.plan import eval_stage_id
from distill_bench.defaults import section_defaults, top_level_default
from distill_bench.forecast import write_forecast_vs_measured
from distill_bench.config.plan import stage_id as stage_id_of
from distill_bench.report import stats

J_PER_KWH = 3.6e6
# the metric the paired comparison, the verdict and N* are decided on
PRIMARY_METRIC = "flexible"
BASELINE_PIPELINE = "sft_gt"

# per seeded run (comparison_by_seed.csv)
SEED_COLUMNS = [
    "experiment", "group", "seed", "pipeline", "student", "dataset", "variant", "lineage", "artifact",
    "artifact_consumers", "strict_acc", "strict_ci_low", "strict_ci_high", "strict_stderr", "flexible_acc",
    "flexible_ci_low", "flexible_ci_high", "flexible_stderr", "eval_n", "eval_backend", "other_evals",
    "teacher_kwh_oneoff", "teacher_kwh_amortised", "upstream_kwh_oneoff", "upstream_kwh_amortised",
    "student_train_kwh", "eval_kwh",
    "total_kwh_oneoff", "total_kwh_amortised", "net_total_kwh_oneoff", "net_total_kwh_amortised",
    "trained_tokens", "processed_tokens", "train_tokens_per_s", "train_j_per_token",
    "teacher_tokens", "co2_kg_oneoff", "duration_s_oneoff", "energy_sources", "status", "missing",
]
# per experiment, over its seeds (comparison.csv)
COMPARISON_COLUMNS = [
    "experiment", "pipeline", "student", "dataset", "variant", "lineage", "artifact", "artifact_consumers",
    "seeds", "n_seeds", "missing_seeds",
    "strict_acc", "strict_ci_low", "strict_ci_high", "strict_stderr", "flexible_acc", "flexible_ci_low",
    "flexible_ci_high", "flexible_stderr", "strict_acc_per_seed", "flexible_acc_per_seed", "flexible_acc_seed_sd",
    "eval_n", "eval_backend", "other_evals",
    "delta_vs_baseline", "delta_ci_low", "delta_ci_high", "p_value", "verdict", "paired_seeds",
    "teacher_kwh_oneoff", "teacher_kwh_amortised", "upstream_kwh_oneoff", "upstream_kwh_amortised",
    "student_train_kwh", "eval_kwh",
    "total_kwh_oneoff", "total_kwh_oneoff_sd", "total_kwh_amortised", "net_total_kwh_oneoff",
    "net_total_kwh_amortised", "kwh_per_quality_point", "break_even_reuse", "break_even_status",
    "trained_tokens", "processed_tokens", "train_tokens_per_s", "train_tokens_per_s_sd", "train_j_per_token",
    "teacher_tokens", "co2_kg_oneoff", "duration_s_oneoff", "energy_sources", "status",
]
# mean over seeds for these per-seed columns
_MEAN_COLUMNS = ["teacher_kwh_oneoff", "teacher_kwh_amortised", "upstream_kwh_oneoff", "upstream_kwh_amortised",
                 "student_train_kwh", "eval_kwh", "total_kwh_oneoff", "total_kwh_amortised", "net_total_kwh_oneoff",
                 "net_total_kwh_amortised", "train_j_per_token", "co2_kg_oneoff", "duration_s_oneoff"]

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


def load_stages(results_dir: str | Path, stage_ids: list[str], optional: set[str] | frozenset = frozenset()
                ) -> dict[str, dict]:
    """Every declared stage JSON; a missing one is an error unless it is in ``optional`` (the stages of one seed
    of an experiment whose other seeds finished: its row then names the missing seed)."""
    energy_dir = Path(results_dir) / "energy"
    stages, missing = {}, []
    for stage_id in stage_ids:
        path = energy_dir / f"{stage_id}.json"
        if not path.exists():
            if stage_id not in optional:
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


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def break_even_reuse(teacher_j: float, student_j: float, baseline_j: float,
                     verdict: str | None) -> tuple[float, str]:
    """(N*, status): N* = ceil(T / (B - S)) with T = teacher_j, S = student_j, B = baseline_j, when B > S.

    N* is a number (status "ok") only when the paired comparison shows the pipeline at least as good as the baseline
    (verdict "better"); otherwise it is NaN and the status names the failed condition: "missing eval" (no verdict:
    an eval result of the pipeline or the baseline is missing), "no baseline", "worse" or "not significant"
    (quality not shown to match), "never" (better, but costs at least as much per student at any reuse; N* = inf).
    Quality is the first gate: its verdict is a tested statement at the configured confidence, while the energy
    margin B - S of two similar pipelines can change sign with the measurement noise; naming the quality condition
    first keeps the status of every row that is not "better" as repeatable as its verdict.
    """
    if _missing(baseline_j):
        return math.nan, "no baseline"
    if any(_missing(v) for v in (teacher_j, student_j)) or verdict is None:
        return math.nan, "missing eval" if verdict is None else "missing energy"
    if verdict == stats.WORSE:
        return math.nan, "worse"
    if verdict != stats.BETTER:
        return math.nan, "not significant"
    margin = baseline_j - student_j
    if margin <= 0:
        return math.inf, "never"
    return float(math.ceil(teacher_j / margin - 1e-12)), "ok"


def _eval_result(results_dir: Path, model_id: str, dataset: str, optional: bool = False) -> dict | None:
    """A declared evaluation's result; ``optional`` (one seed of an experiment with others): a missing file is
    None (that seed is reported missing), anything else wrong with it is still an error."""
    path = results_dir / "eval" / model_id / f"{dataset}.json"
    if optional and not path.exists():
        return None
    return load_eval_result(path)


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
            upstream.append(stage_id_of("train_student", exp=owner))
    evals = [stage_id_of("evaluate", model_id=m, eval_name=d) for m, d in plan["eval_units"] if m == exp_id]
    student = [s for s in (stage_id_of("precompute_reference", exp=exp_id), stage_id_of("train_student", exp=exp_id))
               if s in plan["stage_ids"]]
    return {"teacher": teacher, "upstream": upstream, "student": student, "eval": evals}


def unit_consumers(plan: dict) -> dict[str, int]:
    """How many experiments' bills contain each stage: the divisor of the amortised charge."""
    counts: dict[str, int] = {}
    for exp_id in plan["experiments"]:
        for stage_ids in charged_units(plan, exp_id).values():
            for stage_id in stage_ids:
                counts[stage_id] = counts.get(stage_id, 0) + 1
    return counts


def seed_only_stages(plan: dict) -> set[str]:
    """Stages charged only to runs of one seed, of experiments that have other seeds: such a stage may be missing
    (that seed failed), since each of its experiments can still be reported from its other seeds."""
    exps = plan["experiments"]
    groups = plan.get("groups") or {e: [e] for e in exps}
    charged_to: dict[str, set] = {}
    for exp_id, exp in exps.items():
        for ids in charged_units(plan, exp_id).values():
            for stage_id in ids:
                charged_to.setdefault(stage_id, set()).add((exp.get("group") or exp_id, exp.get("seed")))
    return {stage_id for stage_id, owners in charged_to.items()
            if len({seed for _, seed in owners}) == 1 and all(len(groups.get(g, [])) > 1 for g, _ in owners)}


def _lineage(plan: dict, exp_id: str) -> str:
    chain = list(reversed(plan["experiments"][exp_id].get("lineage") or []))
    return " -> ".join(chain + [exp_id])


def item_scores(results_dir: Path, result: dict | None, model_id: str, dataset: str) -> dict[str, dict[str, float]]:
    """Per-item correctness of one eval, {"strict": {item_id: 0/1}, "flexible": {...}}, from its samples file
    (both backends write one); empty when the eval or its samples are missing."""
    if not result or not result.get("samples"):
        return {}
    path = results_dir / "eval" / model_id / result["samples"]
    if not path.exists():
        return {}
    out: dict[str, dict[str, float]] = {"strict": {}, "flexible": {}}
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("task") not in (None, "distill_arith"):
                continue
            item = str(row.get("id", row.get("doc_id")))
            for name in ("strict", "flexible"):
                if f"{name}_correct" in row:
                    out[name][item] = float(bool(row[f"{name}_correct"]))
    return {k: v for k, v in out.items() if v}


def seed_frame(plan: dict, stages: dict[str, dict], results_dir: str | Path) -> pd.DataFrame:
    """One row per seeded run. A run whose training or eval did not finish is kept with ``missing`` saying what
    is absent, so the per-experiment statistics can name it instead of averaging silently over fewer seeds."""
    results_dir = Path(results_dir)
    n_consumers = unit_consumers(plan)
    optional = seed_only_stages(plan)
    rows = []
    for exp_id, exp in plan["experiments"].items():
        units = charged_units(plan, exp_id)
        absent = [s for ids in units.values() for s in ids if s not in stages]

        def energy(stage_id: str, key: str = "total_j") -> float:
            return _energy(stages[stage_id], key) if stage_id in stages else math.nan

        gross = {b: sum(energy(s) for s in ids) for b, ids in units.items()}
        net = {b: sum(energy(s, "net_j") for s in ids) for b, ids in units.items()}
        share = {b: sum(energy(s) / n_consumers[s] for s in ids) for b, ids in units.items()}
        share_net = {b: sum(energy(s, "net_j") / n_consumers[s] for s in ids) for b, ids in units.items()}
        train_id = stage_id_of("train_student", exp=exp_id)
        train = stages.get(train_id) or {}
        teacher_stages = [stages[s] for s in units["teacher"] if s in stages]
        all_stages = [stages[s] for ids in units.values() for s in ids if s in stages]
        result = _eval_result(results_dir, exp_id, exp["dataset"],
                              optional=eval_stage_id(exp_id, exp["dataset"]) in optional)
        missing = []
        if train_id not in stages or train.get("status") != "complete":
            missing.append("training")
        if result is None:
            missing.append("eval")
        strict, flexible = _metric(result, "strict_match"), _metric(result, "flexible_extract")
        art_id = exp.get("artifact")
        total_oneoff = sum(gross.values())
        counts = (train.get("tokens") or {}).get("counts") or {}
        metrics = train.get("metrics") or {}
        # the final model's trained tokens (the last attempt's running total); the stage's token count sums every
        # attempt, including work redone after a resume, which is what the hardware processed in duration_s
        trained_total = metrics.get("trained_tokens_total")
        processed = counts.get("trained_tokens")
        duration = train.get("duration_s")
        teacher_tokens = sum(((s.get("tokens") or {}).get("counts") or {}).get(
            (s.get("tokens") or {}).get("primary") or "", 0) for s in teacher_stages)
        sources = sorted({f"{k}={v}" for s in all_stages
                          for k, v in ((s.get("energy") or {}).get("sources") or {}).items()})
        statuses = sorted({str(s.get("status")) for s in all_stages} | ({"missing"} if absent else set()))
        rows.append({
            "experiment": exp_id, "group": exp.get("group") or exp_id, "seed": exp.get("seed"),
            "pipeline": exp["pipeline"], "student": exp["student"], "dataset": exp["dataset"],
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
            "trained_tokens": trained_total if trained_total is not None else processed,
            "processed_tokens": processed,
            "train_tokens_per_s": processed / duration if processed and duration else math.nan,
            "train_j_per_token": _energy(train) / processed if processed and train else math.nan,
            "teacher_tokens": teacher_tokens,
            "co2_kg_oneoff": sum((s.get("co2_kg") or 0.0) for s in all_stages),
            "duration_s_oneoff": sum((s.get("duration_s") or 0.0) for s in all_stages),
            "energy_sources": ";".join(sources), "status": ",".join(statuses), "missing": ",".join(missing),
            "_shared_j": gross["teacher"] + gross["upstream"], "_own_j": gross["student"] + gross["eval"],
            "_items": item_scores(results_dir, result, exp_id, exp["dataset"]) if not missing else {},
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=SEED_COLUMNS + ["_shared_j", "_own_j", "_items"])
    return frame


def _matrix(runs: pd.DataFrame, metric: str, items: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """[seeds, items] per-item scores of the given seeded runs, over the items every one of them scored."""
    per_run = [r["_items"].get(metric) or {} for _, r in runs.iterrows()]
    if items is None:
        common = set(per_run[0]) if per_run else set()
        for scores in per_run[1:]:
            common &= set(scores)
        items = sorted(common)
    return np.array([[scores[i] for i in items] for scores in per_run], dtype=np.float64), items


def _seed_list(values) -> str:
    return ",".join(str(int(v)) for v in values)


def comparison_frame(plan: dict, stages: dict[str, dict], results_dir: str | Path,
                     by_seed: pd.DataFrame | None = None, config: dict | None = None) -> pd.DataFrame:
    """One row per experiment: means over its seeds, two-level bootstrap CIs, the paired comparison with the
    baseline, the verdict and N*."""
    by_seed = seed_frame(plan, stages, results_dir) if by_seed is None else by_seed
    if by_seed.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    eval_cfg = {**section_defaults("eval"), **((config or {}).get("eval") or {})}
    n_boot = int(eval_cfg["bootstrap_samples"])
    confidence = float(eval_cfg["confidence"])
    seed = int((config or {}).get("seed", top_level_default("seed")))
    rows = []
    for group, runs in by_seed.groupby("group", sort=False):
        ok = runs[runs.missing == ""]
        first = runs.iloc[0]
        row = {c: first[c] for c in ("pipeline", "student", "dataset", "variant", "artifact", "artifact_consumers")}
        row["experiment"] = group
        row["lineage"] = " -> ".join(part.rsplit(".", 1)[0] for part in first["lineage"].split(" -> "))
        row["seeds"] = _seed_list(runs.seed)
        row["n_seeds"] = len(ok)
        row["missing_seeds"] = "; ".join(f"s{int(r.seed)}: {r.missing}" for _, r in runs.iterrows() if r.missing)
        for metric in ("strict", "flexible"):
            per_seed = {str(int(r.seed)): r[f"{metric}_acc"] for _, r in ok.iterrows()}
            row[f"{metric}_acc_per_seed"] = json.dumps(per_seed)
            mat, items = _matrix(ok, metric) if len(ok) else (np.empty((0, 0)), [])
            if mat.size:
                est = stats.two_level_ci(mat, n_boot, confidence, seed)
                row.update({f"{metric}_acc": est.mean, f"{metric}_ci_low": est.ci_low,
                            f"{metric}_ci_high": est.ci_high, f"{metric}_stderr": float(mat.mean(axis=0).std(
                                ddof=1) / math.sqrt(mat.shape[1])) if mat.shape[1] > 1 else 0.0})
            else:   # no per-item results (or no seed finished): the mean of the seeds' own figures, no CI
                row.update({f"{metric}_acc": ok[f"{metric}_acc"].mean() if len(ok) else math.nan,
                            f"{metric}_ci_low": math.nan, f"{metric}_ci_high": math.nan,
                            f"{metric}_stderr": math.nan})
        row["flexible_acc_seed_sd"] = stats.mean_spread(ok.flexible_acc)[1]
        row["eval_n"] = int(ok.eval_n.max()) if len(ok) and ok.eval_n.notna().any() else None
        row["eval_backend"] = ",".join(sorted({str(b) for b in ok.eval_backend.dropna()})) or None
        row["other_evals"] = ok.other_evals.iloc[0] if len(ok) else ""
        for column in _MEAN_COLUMNS:
            row[column] = ok[column].mean() if len(ok) else math.nan
        row["total_kwh_oneoff_sd"] = stats.mean_spread(ok.total_kwh_oneoff)[1]
        for column in ("trained_tokens", "processed_tokens", "teacher_tokens"):
            row[column] = ok[column].mean() if len(ok) else math.nan
        row["train_tokens_per_s"], row["train_tokens_per_s_sd"] = stats.mean_spread(ok.train_tokens_per_s)
        row["kwh_per_quality_point"] = (row["total_kwh_oneoff"] / (row["flexible_acc"] * 100)
                                        if row["flexible_acc"] and row["flexible_acc"] > 0 else math.inf)
        row["energy_sources"] = ";".join(sorted({x for v in runs.energy_sources for x in str(v).split(";") if x}))
        row["status"] = ",".join(sorted({x for v in runs.status for x in str(v).split(",") if x}))
        row["_shared_j"] = ok._shared_j.mean() if len(ok) else math.nan
        row["_own_j"] = ok._own_j.mean() if len(ok) else math.nan
        row["_runs"] = runs
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column, empty in (("delta_vs_baseline", math.nan), ("delta_ci_low", math.nan), ("delta_ci_high", math.nan),
                          ("p_value", math.nan), ("verdict", ""), ("paired_seeds", ""),
                          ("break_even_reuse", math.nan), ("break_even_status", "")):
        frame[column] = pd.Series([empty] * len(frame), dtype=object if isinstance(empty, str) else float)
    for i, row in frame.iterrows():
        paired = {"delta_vs_baseline": math.nan, "delta_ci_low": math.nan, "delta_ci_high": math.nan,
                  "p_value": math.nan, "verdict": "", "paired_seeds": "", "break_even_reuse": math.nan,
                  "break_even_status": ""}
        base = frame[(frame.pipeline == BASELINE_PIPELINE) & (frame.student == row["student"])
                     & (frame.dataset == row["dataset"])]
        if row["pipeline"] == BASELINE_PIPELINE:
            paired["verdict"] = "baseline"
        elif base.empty:
            paired["break_even_status"] = "no baseline"
        else:
            b = base.iloc[0]
            mine, theirs = row["_runs"], b["_runs"]
            mine, theirs = mine[mine.missing == ""], theirs[theirs.missing == ""]
            seeds = sorted(set(mine.seed) & set(theirs.seed))
            verdict = None
            if seeds:
                mine = mine.set_index("seed").loc[seeds].reset_index()
                theirs = theirs.set_index("seed").loc[seeds].reset_index()
                a, items = _matrix(pd.concat([mine, theirs]), PRIMARY_METRIC)
                if items:
                    x, y = a[:len(seeds)], a[len(seeds):]
                    res = stats.paired_comparison(x, y, n_boot, confidence, seed)
                    verdict = res.verdict
                    paired.update(delta_vs_baseline=res.delta, delta_ci_low=res.ci_low, delta_ci_high=res.ci_high,
                                  p_value=res.p_value, verdict=res.verdict, paired_seeds=_seed_list(seeds))
            if verdict is None:
                paired["verdict"] = "missing eval"
            n_star, status = break_even_reuse(row["_shared_j"], row["_own_j"], b["_own_j"] + b["_shared_j"],
                                              verdict)
            paired.update(break_even_reuse=n_star, break_even_status=status)
        for key, value in paired.items():
            frame.at[i, key] = value
    return frame[COMPARISON_COLUMNS]


def check_amortisation(plan: dict, stages: dict[str, dict], by_seed: pd.DataFrame) -> None:
    """Invariant: the amortised totals of the seeded runs sum back to the measured energy of every charged stage
    (each stage counted once), so nothing is double counted or dropped."""
    charged = {s for exp_id in plan["experiments"] for ids in charged_units(plan, exp_id).values() for s in ids}
    if any(s not in stages for s in charged):
        return   # a missing seed: its row says so; the sum cannot close
    measured = sum(_energy(stages[s]) for s in charged) / J_PER_KWH
    amortised = float(by_seed.total_kwh_amortised.sum())
    if not math.isclose(amortised, measured, rel_tol=1e-9, abs_tol=1e-15):
        raise RollupError(f"amortised totals sum to {amortised!r} kWh but the charged stages measured {measured!r} "
                          f"kWh: the accounting double counts or drops a stage")


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


def _fmt_n_star(value: Any, status: str = "ok") -> str:
    if status and status != "ok":
        return status
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == math.inf:
        return "never"
    return str(int(value))


def _pct(v: float, lo: float, hi: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{100 * v:.1f}"
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _delta(r) -> str:
    if r.verdict == "baseline":
        return "baseline"
    if isinstance(r.delta_vs_baseline, float) and math.isnan(r.delta_vs_baseline):
        return "n/a"
    return (f"{100 * r.delta_vs_baseline:+.1f} [{100 * r.delta_ci_low:+.1f}, {100 * r.delta_ci_high:+.1f}] "
            f"p={r.p_value:.3f}")


def _per_seed(text: str) -> str:
    values = json.loads(text or "{}")
    return " / ".join(f"{100 * v:.1f}" if v == v else "n/a" for v in values.values())


def markdown_table(comparison: pd.DataFrame, references: pd.DataFrame, stages: pd.DataFrame,
                   confidence: float = 0.95) -> str:
    conf = f"{100 * confidence:g} %"
    lines = ["# distill-bench comparison", "",
             f"Energy in Wh (1 Wh = 3600 J), mean over seeds (± sd where shown). Quality: exact match in %, mean "
             f"over seeds with a {conf} two-level bootstrap CI (resampling seeds, then eval items); the per-seed "
             f"values follow. Δ vs sft_gt: paired over matched seeds and eval items (flexible EM), {conf} CI and "
             f"p-value; verdict at {conf} confidence. Teacher side one-off = full cost of the shared teacher "
             "artifact; amortised = split across its consumers in this run (every seed is one consumer). N* = "
             "students that must share the teacher artifact before the pipeline beats plain SFT (sft_gt) on energy; "
             "a number only when the verdict is 'better', else the condition that failed.", "",
             "| experiment | seeds | strict EM | flexible EM | flexible per seed | Δ flexible vs sft_gt | verdict | "
             "scored by | teacher Wh (one-off / amortised) | upstream Wh | train Wh | eval Wh | "
             "total Wh (one-off ± sd / amortised) | trained tokens | train tok/s (± sd) | N* |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in comparison.iterrows():
        seeds = r.seeds if not r.missing_seeds else f"{r.seeds} (missing {r.missing_seeds})"
        tokens = "n/a" if r.trained_tokens != r.trained_tokens else f"{r.trained_tokens:.0f}"
        lines.append(
            f"| {r.experiment} | {seeds} | {_pct(r.strict_acc, r.strict_ci_low, r.strict_ci_high)} | "
            f"{_pct(r.flexible_acc, r.flexible_ci_low, r.flexible_ci_high)} | {_per_seed(r.flexible_acc_per_seed)} | "
            f"{_delta(r)} | {r.verdict} | {r.eval_backend} | "
            f"{1000 * r.teacher_kwh_oneoff:.3f} / {1000 * r.teacher_kwh_amortised:.3f} | "
            f"{1000 * r.upstream_kwh_oneoff:.3f} | {1000 * r.student_train_kwh:.3f} | {1000 * r.eval_kwh:.3f} | "
            f"{1000 * r.total_kwh_oneoff:.3f} ± {1000 * (r.total_kwh_oneoff_sd or 0):.3f} / "
            f"{1000 * r.total_kwh_amortised:.3f} | {tokens} | "
            f"{(r.train_tokens_per_s or 0):.0f} ± {(r.train_tokens_per_s_sd or 0):.0f} | "
            f"{_fmt_n_star(r.break_even_reuse, r.break_even_status)} |")
    missing = comparison[comparison.missing_seeds.fillna("") != ""]
    if len(missing):
        lines += ["", "Missing seeds (the statistics of these rows use the other seeds only):", ""]
        lines += [f"- {r.experiment}: {r.missing_seeds}" for _, r in missing.iterrows()]
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
    accept_shared = bool({**section_defaults("energy"), **((config or {}).get("energy") or {})}["accept_shared_devices"])
    optional = seed_only_stages(plan)
    stages = load_stages(results_dir, plan["stage_ids"], optional)
    for model_id, dataset in plan["eval_units"]:     # every declared evaluation, before any output is written
        _eval_result(results_dir, model_id, dataset, optional=eval_stage_id(model_id, dataset) in optional)
    # the run's own counters against the stages' sum; fails (after writing reconciliation.md) on double counting
    record = reconcile.reconcile_run(results_dir, stages, in_workflow=in_workflow)
    reconcile.enforce(record, accept_shared)
    stage_frame = stages_frame(stages)
    by_seed = seed_frame(plan, stages, results_dir)
    if not by_seed.empty:
        lost = [g for g, runs in by_seed.groupby("group", sort=False) if (runs.missing != "").all()]
        if lost:
            absent = sorted(s for s in optional if s not in stages)
            raise RollupError(f"no seed of experiment(s) {', '.join(lost)} finished (missing stage JSONs: "
                              f"{', '.join(absent) or 'none'}; missing eval results otherwise); rerun them")
    check_amortisation(plan, stages, by_seed)
    comparison = comparison_frame(plan, stages, results_dir, by_seed, config)
    # a row is charged a shared device when any of its seeds is; such rows (and rows whose baseline is one) keep
    # no N* and no verdict unless energy.accept_shared_devices
    charged: dict[str, list[str]] = {}
    for exp_id, exp in plan["experiments"].items():
        charged.setdefault(exp.get("group") or exp_id, []).extend(
            s for ids in charged_units(plan, exp_id).values() for s in ids)
    comparison = reconcile.mark_shared_rows(comparison, charged, reconcile.shared_stage_ids(stages, record),
                                            accept_shared)
    not_comparable = ~comparison["comparable"].astype(bool) & (comparison["verdict"] != "baseline")
    comparison.loc[not_comparable, "verdict"] = "not comparable (shared device)"
    comparison.loc[not_comparable, "break_even_status"] = "shared device"
    references = reference_rows(plan, results_dir)
    out = results_dir / "summary"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "stages.csv", stage_frame.to_csv(index=False))
    atomic_write_text(out / "comparison.csv", comparison.to_csv(index=False))
    atomic_write_text(out / "comparison_by_seed.csv", by_seed.reindex(columns=SEED_COLUMNS).to_csv(index=False))
    atomic_write_text(out / "references.csv", references.to_csv(index=False))
    confidence = float({**section_defaults("eval"), **((config or {}).get("eval") or {})}["confidence"])
    md = markdown_table(comparison, references, stage_frame, confidence) + reconcile.comparison_notes(
        comparison, record, accept_shared)
    atomic_write_text(out / "comparison.md", md)
    write_forecast_vs_measured(config, stages, out)
    if plots:
        from distill_bench.report.plots import plot_energy_by_role, plot_pareto, plot_run_timeline

        sizes = {name: spec.get("size_label") for name, spec in (config or {}).get("students", {}).items()}
        if not comparison.empty:
            plot_pareto(comparison, out / "pareto.png", size_labels=sizes, by_seed=by_seed)
            plot_energy_by_role(comparison, out / "energy_by_role.png")
        plot_run_timeline(stage_frame, out / "run_timeline.png", record)
    from distill_bench.report.html import write_html_summary

    notes = [line for line in md.splitlines() if line.startswith(("Note:", "Estimated", "Missing", "Reconciliation"))]
    write_html_summary(out, (config or {}).get("run_name", results_dir.name), comparison, references, stage_frame,
                       notes)
    if print_table:
        print(md)
    return comparison
