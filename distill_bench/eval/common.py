"""Eval config parsing and dataset loading shared by the native and lm-eval backends."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from distill_bench.defaults import allowed_values, section_defaults
from distill_bench.models.tokenizer import tokenizer_ref

# the schema's `eval` section
DEFAULTS = section_defaults("eval")
EVAL_KEYS = set(DEFAULTS)
EVAL_BACKENDS = allowed_values("eval", "backend")


def parse_eval_config(eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the ``eval`` config section; every error names ``eval.<key>``."""
    if not isinstance(eval_cfg, Mapping):
        raise TypeError(f"eval must be a mapping, got {type(eval_cfg).__name__}")
    unknown = sorted(set(eval_cfg) - EVAL_KEYS)
    if unknown:
        raise ValueError(f"unknown eval setting(s) {', '.join('eval.' + k for k in unknown)}; "
                         f"known: {', '.join(sorted(EVAL_KEYS))}")
    cfg = {**DEFAULTS, **dict(eval_cfg)}
    if cfg["backend"] not in EVAL_BACKENDS:
        raise ValueError(f"eval.backend must be one of {', '.join(EVAL_BACKENDS)}, got {cfg['backend']!r}")
    for key in ("max_new_tokens", "batch_size", "bootstrap_samples"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"eval.{key} must be an integer >= 1, got {v!r}")
    c = cfg["confidence"]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1:
        raise ValueError(f"eval.confidence must be in (0, 1), got {c!r}")
    lim = cfg["limit"]
    if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
        raise ValueError(f"eval.limit must be null or an integer >= 1, got {lim!r}")
    tasks = cfg["tasks"]
    if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks)):
        raise ValueError(f"eval.tasks must be a list of task names, got {tasks!r}")
    return cfg


def load_split(dataset: str | os.PathLike, split: str, limit: int | None = None):
    """The ``split`` of a saved DatasetDict (common record schema), first ``limit`` rows."""
    from datasets import load_from_disk

    path = Path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"eval dataset {str(path)!r} does not exist")
    dd = load_from_disk(str(path))
    if split not in dd:
        raise KeyError(f"eval dataset {str(path)!r} has no split {split!r}; splits: {', '.join(dd)}")
    ds = dd[split]
    missing = {"id", "prompt"} - set(ds.column_names)
    if missing or not ({"answer", "response"} & set(ds.column_names)):
        raise ValueError(f"eval dataset {str(path)!r} split {split!r} lacks columns "
                         f"{sorted(missing) or ['answer or response']}; has {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"eval dataset {str(path)!r} split {split!r} is empty")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def gold_of(row: Mapping[str, Any]) -> str:
    """The reference answer: ``answer`` when set, else the full response (normalisation strips to ``#### N``)."""
    ans = row.get("answer")
    return str(ans) if ans is not None else str(row.get("response") or "")


def samples_path(out_json: str | os.PathLike) -> Path:
    p = Path(out_json)
    return p.with_name(p.stem + ".samples.jsonl")


def resolve_model(model: str | os.PathLike) -> str:
    """The directory / HF id to load (follows ``model_ref.json`` pointers via ``distill_bench.models.build``);
    a local path that is missing or holds no model is a FileNotFoundError naming it."""
    try:
        from distill_bench.models.build import resolve_model_ref
    except ImportError:  # models module absent: plain directories only
        resolve_model_ref = None
    if resolve_model_ref is not None:
        return resolve_model_ref(model)
    m = Path(model)
    if m.is_dir() and not (m / "config.json").exists():
        raise FileNotFoundError(f"model directory {str(m)!r} has no config.json (not a saved HF model)")
    return str(model)


def check_model_dir(model: str | os.PathLike, tokenizer: str | os.PathLike | None) -> str:
    """Fail before loading anything: the model must resolve and a tokenizer must be findable. Returns the
    resolved model path / id.

    ``tokenizer`` (None = the model's own) may be a model directory holding a ``model_ref.json`` pointer: the
    pointer's configured tokenizer (else its model) is what is checked and loaded."""
    target = resolve_model(model)
    tok = Path(tokenizer_ref(tokenizer if tokenizer else model))  # a model_ref.json pointer names its tokenizer
    if tok.exists() and not any((tok / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                             "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer in {str(tok)!r} (expected tokenizer.json / tokenizer_config.json)"
                                + ("; pass the tokenizer directory explicitly" if not tokenizer else ""))
    return target
