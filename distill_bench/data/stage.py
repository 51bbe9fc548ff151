"""prepare_data stage: one config ``datasets.<name>`` section -> a saved DatasetDict + summary + content hash.

The content hash (sha256 of the canonical records) is what downstream caches (logit caches, synthetic sets, evals)
key on, so a changed dataset invalidates them while an identical rebuild does not.
"""
from __future__ import annotations

import logging
import statistics
from typing import Any, Mapping

import datasets

from distill_bench.data.io import content_hash, save_dataset_dir
from distill_bench.data.preprocess import FAMILIES, chat_token_lengths, preprocess
from distill_bench.data.task import generate_task

log = logging.getLogger(__name__)

SOURCES = ("embedded",) + FAMILIES
_SPEC_KEYS = {"source", "path", "split", "eval_split", "subset", "n_train", "n_eval", "max_length", "task"}
_TASK_KEYS = {"min_steps", "max_steps", "max_operand", "ops"}


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the tokenizer {tokenizer!r} used for the dataset length filter "
                                f"(tokenizer.source / its path; on an offline node point it at a local copy): "
                                f"{exc}") from exc


def _length_filter_dict(dsd: datasets.DatasetDict, tokenizer: Any, max_length: int, name: str) -> tuple[
        datasets.DatasetDict, dict[str, int]]:
    """Drop records whose chat-templated prompt+response exceeds ``max_length`` tokens (embedded task path)."""
    dropped: dict[str, int] = {}
    out = {}
    for split, ds in dsd.items():
        lengths = chat_token_lengths(tokenizer, ds["prompt"], ds["response"])
        keep = [i for i, n in enumerate(lengths) if n <= max_length]
        dropped[split] = len(ds) - len(keep)
        if not keep:
            raise ValueError(f"dataset {name!r} split {split!r} is empty after the length filter "
                             f"datasets.{name}.max_length={max_length}")
        out[split] = ds.select(keep) if dropped[split] else ds
    return datasets.DatasetDict(out), dropped


def build_dataset(*, dataset_name: str, spec: Mapping[str, Any], seed: int,
                  tokenizer: Any = None) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Build the DatasetDict described by ``spec`` (a ``datasets.<name>`` config section) and its filter stats."""
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"datasets.{dataset_name}: unknown key(s) {unknown}; allowed: {sorted(_SPEC_KEYS)}")
    source = spec.get("source")
    if source not in SOURCES:
        raise ValueError(f"datasets.{dataset_name}.source must be one of {SOURCES}, got {source!r}")
    n_eval = spec.get("n_eval")
    if n_eval is None:
        raise ValueError(f"datasets.{dataset_name}.n_eval is required")
    tok = _load_tokenizer(tokenizer)
    max_length = spec.get("max_length") if tok is not None else None
    stats: dict[str, Any] = {"length_filter": "applied" if max_length else "skipped (no tokenizer or max_length)"}
    if source == "embedded":
        task = dict(spec.get("task") or {})
        bad = sorted(set(task) - _TASK_KEYS)
        if bad:
            raise ValueError(f"datasets.{dataset_name}.task: unknown key(s) {bad}; allowed: {sorted(_TASK_KEYS)}")
        if "ops" in task:
            task["ops"] = tuple(task["ops"])
        n_train = spec.get("n_train")
        if n_train is None:
            raise ValueError(f"datasets.{dataset_name}.n_train is required for the embedded task")
        dsd = generate_task(seed=seed, n_train=n_train, n_eval=n_eval, name=dataset_name, **task)
        if max_length:
            dsd, dropped = _length_filter_dict(dsd, tok, max_length, dataset_name)
            stats["dropped"] = {"max_length": sum(dropped.values())}
    else:
        if not spec.get("path"):
            raise ValueError(f"datasets.{dataset_name}.path is required for source {source!r} "
                             f"(an HF hub id or a local parquet/jsonl/arrow path)")
        dsd, pstats = preprocess(family=source, path=spec["path"], dataset_name=dataset_name, seed=seed,
                                 n_eval=n_eval, n_train=spec.get("n_train"), split=spec.get("split") or "train",
                                 subset=spec.get("subset"), tokenizer=tok, max_length=max_length,
                                 eval_split=spec.get("eval_split"))
        stats.update(pstats)
        if pstats.get("train_short_by"):
            log.warning("dataset %s: only %d train rows available after filtering (n_train=%s)",
                        dataset_name, len(dsd["train"]), spec.get("n_train"))
    return dsd, stats


def _length_summary(ds: datasets.Dataset) -> dict[str, Any]:
    out = {}
    for col in ("prompt", "response"):
        chars = [len(t) for t in ds[col]]
        words = [len(t.split()) for t in ds[col]]
        out[col] = {"chars_mean": round(statistics.fmean(chars), 2), "chars_max": max(chars),
                    "words_mean": round(statistics.fmean(words), 2), "words_max": max(words)}
    return out


def prepare_data(*, meter: Any, out_dir: str, dataset_name: str, spec: dict, seed: int,
                 tokenizer: str | None = None) -> dict[str, Any]:
    """Build, save atomically to ``out_dir`` (with ``summary.json``) and report the dataset; returns the summary."""
    dsd, stats = build_dataset(dataset_name=dataset_name, spec=spec, seed=seed, tokenizer=tokenizer)
    digest = content_hash(dsd)
    summary = {
        "dataset": dataset_name,
        "source": spec.get("source"),
        "path": spec.get("path"),
        "seed": seed,
        "n_train": len(dsd["train"]),
        "n_eval": len(dsd["eval"]),
        "content_hash": digest,
        "lengths_train": _length_summary(dsd["train"]),
        "stats": stats,
        "spec": dict(spec),
    }
    save_dataset_dir(dsd, out_dir, summary)
    meter.record("n_train", summary["n_train"])
    meter.record("n_eval", summary["n_eval"])
    meter.record("content_hash", digest)
    for key in ("rows_read", "kept", "multi_turn_truncated"):
        if key in stats:
            meter.record(key, stats[key])
    for reason, count in (stats.get("dropped") or {}).items():
        meter.record(f"dropped_{reason}", count)
    log.info("dataset %s: %d train / %d eval rows -> %s (hash %s)", dataset_name, summary["n_train"],
             summary["n_eval"], out_dir, digest[:12])
    return summary
