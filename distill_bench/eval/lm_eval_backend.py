"""EleutherAI lm-evaluation-harness backend, through its Python API (``lm_eval.simple_evaluate`` on an ``HFLM``).

One call evaluates one model on one or more tasks (the workflow runs one metered stage per (model, task)). Standard
tasks (gsm8k, mmlu, ifeval, ...) are used by name; the embedded task ``distill_arith`` is our local task YAML over
the eval split exported to JSONL, so it runs offline. Task names are checked against lm-eval's task index (close
matches suggested) and task data is loaded *before* the model, so a typo or data that is not available offline fails
in seconds. Tokens are counted by wrapping the ``HFLM``: generated tokens are those the model actually produced
(up to and including EOS, never padding), input tokens are non-padding context tokens, and loglikelihood requests
are counted per call.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import os
import tempfile
from pathlib import Path
from statistics import NormalDist
from typing import Any, Mapping

import yaml

from distill_bench.atomic import atomic_write_json, atomic_write_text, short_hash
from distill_bench.eval.common import check_model_dir, load_split, parse_eval_config, samples_path
from distill_bench.eval.scoring import bootstrap_ci
from distill_bench.models.tokenizer import tokenizer_ref

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
EMBEDDED_TASKS = {p.stem for p in TASK_DIR.glob("*.yaml")}
# lm-eval metric keys -> the names the comparison table uses for both backends
METRIC_NAMES = {"exact_match,strict-match": "strict_match", "exact_match,flexible-extract": "flexible_extract"}
# per-item correctness fields of the samples file, shared with the native backend's
ITEM_FIELDS = {"strict_match": "strict_correct", "flexible_extract": "flexible_correct"}


def harness_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


@functools.lru_cache(maxsize=2)
def task_manager(include_path: str | None = None):
    """lm-eval's task index (our shipped task dir included); building it scans every task YAML (~10 s on 2
    cores), so it is built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path or TASK_DIR))


def check_task_names(tasks: list[str], manager=None) -> None:
    """Unknown task -> ValueError listing close matches from lm-eval's task index (no model is loaded)."""
    manager = manager or task_manager()
    known = set(manager.all_tasks)
    bad = [t for t in tasks if t not in known]
    if bad:
        msgs = []
        for t in bad:
            close = difflib.get_close_matches(t, sorted(known), n=5, cutoff=0.6)
            msgs.append(f"{t!r} (close matches: {', '.join(close)})" if close else f"{t!r} (no close match)")
        raise ValueError(f"unknown lm-eval task(s) in eval.tasks: {'; '.join(msgs)} "
                         f"[lm_eval {harness_version()}, {len(known)} tasks/groups known]")


def embedded_task_config(name: str, data_jsonl: str | os.PathLike, max_new_tokens: int) -> dict[str, Any]:
    """Our shipped task YAML with the exported eval split and the generation length filled in."""
    cfg = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    cfg["dataset_kwargs"] = {"data_files": {cfg["test_split"]: str(data_jsonl)}}
    cfg["generation_kwargs"]["max_gen_toks"] = int(max_new_tokens)
    return cfg


def dataset_task(dataset: str | None, split: str) -> str:
    """Our local task for a dataset's split: ``distill_gsm8k`` (lm-eval's gsm8k prompt, stops, filters and metric)
    when its records come from GSM8K, else ``distill_arith`` (the same filters and metric, the prompt as is)."""
    if dataset:
        rows = load_split(dataset, split, 1)
        if "source" in rows.column_names and len(rows) and rows[0]["source"] == "gsm8k":
            return "distill_gsm8k"
    return "distill_arith"


def export_split_jsonl(dataset: str, split: str, limit: int | None, path: Path) -> Path:
    rows = load_split(dataset, split, limit)
    cols = [c for c in ("id", "prompt", "response", "answer") if c in rows.column_names]
    atomic_write_text(path, "".join(json.dumps({c: r.get(c) for c in cols}) + "\n" for r in rows))
    return path


def _load_tasks(manager, tasks: list[str], specs: Mapping[str, Any]):
    """Build the tasks (this loads their data) with offline failures turned into a clear message. ``specs`` maps a
    task name to what ``TaskManager.load`` gets (a name, or our filled config dict)."""
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in
                  ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    loaded = {}
    for name in tasks:
        try:
            result = manager.load([specs[name]])
        except Exception as e:  # datasets raises ConnectionError / ValueError / FileNotFoundError offline
            hint = (" HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and the task's data is not in the local HF cache: "
                    "download it on a machine with network (e.g. run this task once there, or "
                    "`datasets.load_dataset(...)`) and copy the cache, or unset the offline variables."
                    if offline else "")
            raise RuntimeError(f"lm-eval task {name!r}: could not load its data ({type(e).__name__}: {e}).{hint}") \
                from e
        loaded.update(result["tasks"])
    return loaded


def _config_hash(task) -> str:
    if isinstance(task, dict):
        return short_hash(task)
    try:
        cfg = task.dump_config() if hasattr(task, "dump_config") else dict(task.config)
    except Exception:
        cfg = repr(getattr(task, "config", task))
    return short_hash(cfg)


def counting_lm(model_dir: str, tokenizer: str, batch_size: int, device: str | None = None, max_length=None):
    """An ``HFLM`` subclass instance that counts the work it does."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from distill_bench.generation.hf_backend import count_generated

    class CountingHFLM(HFLM):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.counts = {"generated_tokens": 0, "input_tokens": 0, "generate_requests": 0,
                           "loglikelihood_requests": 0, "loglikelihood_rolling_requests": 0}

        def _model_generate(self, context, max_length, stop, **kw):
            out = super()._model_generate(context, max_length, stop, **kw)
            eos = {self.tokenizer.eos_token_id}
            for row in out[:, context.shape[1]:].tolist():
                self.counts["generated_tokens"] += count_generated(row, eos)[0]
            mask = kw.get("attention_mask")
            if mask is not None:
                self.counts["input_tokens"] += int(mask.sum())
            else:
                self.counts["input_tokens"] += int((context != self.tokenizer.pad_token_id).sum())
            self.counts["generate_requests"] += int(context.shape[0])
            return out

        def loglikelihood(self, requests, *a, **kw):
            self.counts["loglikelihood_requests"] += len(requests)
            return super().loglikelihood(requests, *a, **kw)

        def loglikelihood_rolling(self, requests, *a, **kw):
            self.counts["loglikelihood_rolling_requests"] += len(requests)
            return super().loglikelihood_rolling(requests, *a, **kw)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return CountingHFLM(pretrained=str(model_dir), tokenizer=str(tokenizer), batch_size=batch_size, device=device,
                        max_length=max_length)


def per_item_scores(samples: list[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's logged samples (one per document and filter) -> {metric name: {item id: score}}; the item id is
    the document's own ``id`` when it has one (our embedded task: the native backend's ids), else lm-eval's doc_id."""
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        doc = s.get("doc") if isinstance(s.get("doc"), Mapping) else {}
        item = str(doc.get("id", s.get("doc_id")))
        for metric in s.get("metrics") or []:
            value = s.get(metric)
            if isinstance(value, bool) or isinstance(value, (int, float)):
                name = f"{metric},{s.get('filter', 'none')}"
                out.setdefault(METRIC_NAMES.get(name, name), {})[item] = float(value)
    return out


def _metrics(task_results: Mapping[str, Any], confidence: float, items: Mapping[str, Mapping[str, float]]
             | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Value and stderr as lm-eval reports them; the interval is the percentile bootstrap over the per-item results
    where lm-eval logged them (it stays inside the metric's range, e.g. [0, 1]), else value ± z * stderr with z
    from the exact confidence."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    items = items or {}
    out = {}
    for key, value in task_results.items():
        if "_stderr," in key or key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        se = task_results.get(f"{metric}_stderr,{filt}")
        se = float(se) if isinstance(se, (int, float)) and not math.isnan(se) else None
        name = METRIC_NAMES.get(key, key)
        per_item = list((items.get(name) or {}).values())
        if per_item:
            low, high = bootstrap_ci(per_item, n_boot, confidence, seed)
            ci = {"ci_low": low, "ci_high": high, "ci_method": "bootstrap over lm-eval's per-item results"}
        else:
            ci = {"ci_low": float(value) - z * se if se is not None else None,
                  "ci_high": float(value) + z * se if se is not None else None, "ci_method": "normal (stderr)"}
        out[name] = {"value": float(value), "stderr": se, **ci}
    return out


def sample_lines(task: str, samples: list[Mapping[str, Any]]) -> list[str]:
    """One JSON line per document (lm-eval logs one sample per document and filter), with the per-item fields the
    roll-up's paired statistics read (``id``, ``strict_correct``, ``flexible_correct``), as the native backend."""
    by_doc: dict[Any, dict[str, Any]] = {}
    for s in samples:
        doc = s.get("doc") if isinstance(s.get("doc"), Mapping) else {}
        row = by_doc.setdefault(s.get("doc_id"), {"task": task, "doc_id": s.get("doc_id"),
                                                  "id": str(doc.get("id", s.get("doc_id"))),
                                                  "target": s.get("target"), "resps": s.get("resps"),
                                                  "filtered_resps": {}, "metrics": {}})
        filt = s.get("filter", "none")
        row["filtered_resps"][filt] = s.get("filtered_resps")
        for metric in s.get("metrics") or []:
            if metric in s:
                name = METRIC_NAMES.get(f"{metric},{filt}", f"{metric},{filt}")
                row["metrics"][name] = s[metric]
                if name in ITEM_FIELDS:
                    row[ITEM_FIELDS[name]] = bool(s[metric])
    return [json.dumps(row, default=str) for row in by_doc.values()]


def evaluate_lm_eval(*, meter, model: str, tokenizer: str | None, dataset: str | None, out_json: str,
                     eval: Mapping[str, Any], model_id: str, seed: int, split: str = "eval",
                     task: str | None = None) -> dict[str, Any]:
    """Run lm-eval on ``model`` for ``task`` and write one result JSON. ``task=None`` means our local task over
    ``dataset`` (the workflow's per-dataset eval: lm-eval's own gsm8k task for a GSM8K-source dataset, else
    ``distill_arith``); a standard task (gsm8k, mmlu, ...) needs no dataset."""
    cfg = parse_eval_config(eval)
    tasks = [task or dataset_task(dataset, split)]
    manager = task_manager()
    # every configured task is checked, so a typo in eval.tasks fails the first eval stage, before any model loads
    check_task_names(tasks + [t for t in cfg["tasks"] or [] if t not in tasks], manager)
    if any(t in EMBEDDED_TASKS for t in tasks) and not dataset:
        raise ValueError(f"lm-eval task {tasks[0]!r} is our embedded task and needs the dataset directory")
    target = check_model_dir(model, tokenizer)
    tokenizer = tokenizer_ref(tokenizer or model)   # HFLM loads a path/id: a pointer dir names the tokenizer
    model = target
    import lm_eval

    with tempfile.TemporaryDirectory(prefix="distill_bench_lmeval_") as tmp:
        specs: dict[str, Any] = {t: t for t in tasks}
        if any(t in EMBEDDED_TASKS for t in tasks):
            data = export_split_jsonl(dataset, split, cfg["limit"], Path(tmp) / f"{split}.jsonl")
            specs.update({t: embedded_task_config(t, data, cfg["max_new_tokens"]) for t in tasks
                          if t in EMBEDDED_TASKS})
        loaded = _load_tasks(manager, tasks, specs)  # data first: offline failures before the model loads
        lm = counting_lm(model, tokenizer, cfg["batch_size"])
        gen_kwargs = None if all(t in EMBEDDED_TASKS for t in tasks) else {"max_gen_toks": cfg["max_new_tokens"]}
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(loaded.values()), limit=cfg["limit"], apply_chat_template=True,
            bootstrap_iters=cfg["bootstrap_samples"], random_seed=int(seed), numpy_random_seed=int(seed),
            torch_random_seed=int(seed), fewshot_random_seed=int(seed), log_samples=True,
            task_manager=manager, gen_kwargs=gen_kwargs)
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    counts = lm.counts
    meter.add_tokens("generated_tokens", counts["generated_tokens"])
    meter.add_tokens("input_tokens", counts["input_tokens"])
    meter.set_primary_tokens("generated_tokens")
    meter.record("loglikelihood_requests", counts["loglikelihood_requests"] + counts["loglikelihood_rolling_requests"])
    meter.record("generate_requests", counts["generate_requests"])

    per_task = {}
    for name, t in loaded.items():
        res = results["results"].get(name, {})
        n = results.get("n-samples", {}).get(name, {})
        items = per_item_scores((results.get("samples") or {}).get(name) or [])
        per_task[name] = {"metrics": _metrics(res, cfg["confidence"], items, cfg["bootstrap_samples"], int(seed)),
                          "n": int(n.get("effective", n.get("original", 0)) or 0),
                          "version": results.get("versions", {}).get(name),
                          # embedded: hash the filled YAML with the dataset dir, not the temporary JSONL path
                          "config_hash": _config_hash(embedded_task_config(name, f"{dataset}:{split}",
                                                                           cfg["max_new_tokens"])
                                                      if name in EMBEDDED_TASKS else t)}
        for mname, m in per_task[name]["metrics"].items():
            meter.record(f"{name}/{mname}" if len(loaded) > 1 else mname, m["value"])
    spath = samples_path(out_json)
    lines = []
    for name, samples in (results.get("samples") or {}).items():
        lines += sample_lines(name, samples)
    atomic_write_text(spath, "\n".join(lines) + ("\n" if lines else ""))
    single = per_task[tasks[0]] if len(tasks) == 1 else None
    out = {"model_id": model_id, "dataset": str(dataset), "split": split, "backend": "lm_eval",
           "harness": "lm-evaluation-harness", "harness_version": harness_version(), "seed": int(seed),
           "tasks": per_task, "ci_method": "bootstrap over per-item results (normal from stderr where lm-eval logs "
                                           "none)", "confidence": cfg["confidence"],
           "n": single["n"] if single else sum(v["n"] for v in per_task.values()),
           "metrics": single["metrics"] if single else
           {f"{t}/{k}": v for t, r in per_task.items() for k, v in r["metrics"].items()},
           "tokens": {"generated_tokens": counts["generated_tokens"], "input_tokens": counts["input_tokens"]},
           "requests": {k: v for k, v in counts.items() if k.endswith("requests")}, "samples": spath.name}
    atomic_write_json(out_json, out, allow_nan=True)
    return out
