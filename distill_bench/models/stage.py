"""Workflow stages of the models module: tokenizer, teacher and student initialisation.

Big pretrained models are never copied into results/: their stage writes a ``model_ref.json`` pointer after checking
that their tokenizer has the run's vocabulary (tokenizer only — weights are not loaded here).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from distill_bench.atomic import replace_dir, write_dir_atomically
from distill_bench.models.build import (count_parameters, init_model_from_arch, resolve_model_ref, save_model_dir,
                                        write_model_ref)
from distill_bench.models.tokenizer import (assert_same_tokenizer, encode_prompt_response, load_tokenizer,
                                            require_chat_template, save_tokenizer, train_tokenizer, vocab_hash)
from distill_bench.models.vocab import vocabulary_hash
from distill_bench.train.trainer import TrainSettings, train_student
from distill_bench.config.plan import TEACHER_TRAIN_KEYS

log = logging.getLogger(__name__)


def load_split(dataset_dir: str | os.PathLike, split: str = "train"):
    """One split of a saved DatasetDict (or a saved Dataset), with a clear error naming the path."""
    from datasets import Dataset, DatasetDict, load_from_disk

    p = Path(dataset_dir)
    if not p.exists():
        raise FileNotFoundError(f"dataset path {str(p)!r} does not exist")
    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(f"dataset path {str(p)!r} is not a saved HF dataset: {exc}") from exc
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise KeyError(f"dataset {str(p)!r} has no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    if not isinstance(ds, Dataset):
        raise TypeError(f"dataset {str(p)!r}: unexpected type {type(ds).__name__}")
    missing = [c for c in ("prompt", "response") if c not in ds.column_names]
    if missing:
        raise KeyError(f"dataset {str(p)!r} split {split!r} lacks column(s) {missing}")
    return ds


def prepare_tokenizer(*, meter, out_dir: str, source: str, vocab_size: int, datasets: list[str] | str,
                      seed: int) -> dict[str, Any]:
    """'train': BPE on the train splits' prompts+responses; else copy an HF tokenizer (it must carry a chat template)."""
    if isinstance(datasets, str):
        datasets = [datasets]
    if source == "train":
        texts: list[str] = []
        for d in datasets:
            ds = load_split(d, "train")
            texts.extend(ds["prompt"])
            texts.extend(ds["response"])
        tok = train_tokenizer(texts, int(vocab_size), out_dir)
        meter.record("training_texts", len(texts))
    else:
        tok = load_tokenizer(source)
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"tokenizer.source {source!r} has no chat template; pick a chat/instruct tokenizer")
        save_tokenizer(tok, out_dir)
    h = vocab_hash(tok)
    meter.record("vocab_hash", h)
    meter.record("vocab_size", len(tok))
    meter.record("tokenizer_source", source)
    meter.record("seed", int(seed))
    return {"vocab_hash": h, "vocab_size": len(tok)}


def _pointer_dir(out_dir: str | os.PathLike, spec: Mapping[str, Any], what: str, run_tokenizer=None,
                 tokenizer_dir: str | None = None) -> dict[str, Any]:
    """Check a pretrained model's tokenizer, then write ``out_dir/model_ref.json`` atomically (weights not loaded).

    The tokenizer is the model's own unless ``spec['tokenizer']`` names another; it must carry a chat template and
    fit the model's embedding matrix (which may be padded beyond it: those rows are never a real token). With
    ``run_tokenizer`` (the run's shared one) it must also have the run's vocabulary.
    """

    name_or_path = spec.get("name_or_path")
    if not name_or_path:
        raise ValueError(f"{what}.name_or_path is required when {what}.source/init is 'pretrained'")
    target = resolve_model_ref(name_or_path)  # clear error for a missing local path
    tok_ref = spec.get("tokenizer") or target
    tok = load_tokenizer(tok_ref)
    require_chat_template(tok, f"{what} {target!r}")
    if run_tokenizer is not None:
        assert_same_tokenizer(tok, run_tokenizer, what, names=(str(tok_ref), str(tokenizer_dir)))
    rows = _embedding_rows(target)
    if rows is not None and rows < len(tok):
        raise ValueError(f"{what} {target!r} has {rows} embedding rows but its tokenizer {tok_ref!r} has {len(tok)} "
                         f"tokens: they were not built together (set {what}.tokenizer to the model's own)")
    info = {"vocab_hash": vocab_hash(tok), "vocabulary_hash": vocabulary_hash(tok), "tokenizer": str(tok_ref),
            "tokenizer_size": len(tok), "embedding_rows": rows}
    write_dir_atomically(out_dir, lambda tmp: write_model_ref(tmp, target, **info))
    return info


def _embedding_rows(name_or_path: str) -> int | None:
    """The model config's vocab_size (rows of its embedding matrix), read without weights."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 -- the tokenizer loaded; a config problem surfaces when loading weights
        log.warning("could not read the config of %s: %s", name_or_path, exc)
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text, "vocab_size", None)
    return int(vocab) if vocab is not None else None


def _param_count_from_config(name_or_path: str) -> int | None:
    """Parameter count without loading weights (meta device)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        return count_parameters(model)
    except Exception as exc:  # informative only; never fail the stage for it
        log.warning("could not count parameters of %s: %s", name_or_path, exc)
        return None


def encode_split(tokenizer, ds, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """encode_prompt_response over a split; returns (examples with ``example_index`` = row, dropped count)."""

    examples, dropped = [], 0
    for i, (prompt, response) in enumerate(zip(ds["prompt"], ds["response"])):
        enc = encode_prompt_response(tokenizer, prompt, response, max_length)
        if enc is None:
            dropped += 1
            continue
        enc["example_index"] = i
        examples.append(enc)
    return examples, dropped


def prepare_teacher(*, meter, out_dir: str, teacher: Mapping[str, Any], dataset: str,
                    training: Mapping[str, Any] | None, seed: int, tokenizer: str | None = None) -> dict[str, Any]:
    """'train': init from teacher.arch and train on ``dataset``'s train split (``tokenizer``: the run's);
    'pretrained': model_ref.json pointer (``tokenizer`` given: the run's shared one, which it must match)."""

    source = teacher.get("source")
    if source == "pretrained":
        info = _pointer_dir(out_dir, teacher, "teacher", load_tokenizer(tokenizer) if tokenizer else None, tokenizer)
        for key in ("vocab_hash", "vocabulary_hash", "tokenizer", "tokenizer_size", "embedding_rows"):
            meter.record(key, info[key])
        meter.record("teacher", teacher.get("name_or_path"))
        params = _param_count_from_config(teacher["name_or_path"])
        if params is not None:
            meter.record("parameters", params)
        return {"vocab_hash": info["vocab_hash"]}
    if not tokenizer:
        raise ValueError("prepare_teacher: a teacher trained from teacher.arch needs the run's tokenizer")
    tok = load_tokenizer(tokenizer)
    if source != "train":
        raise ValueError(f"teacher.source must be 'train' or 'pretrained', got {source!r}")
    arch = teacher.get("arch")
    if not arch:
        raise ValueError("teacher.arch is required when teacher.source is 'train'")
    tr = dict(teacher.get("train") or {})
    if "tokens" not in tr:
        raise ValueError("teacher.train.tokens is required when teacher.source is 'train'")
    overrides = {"token_budget": int(tr["tokens"])}
    for key in TEACHER_TRAIN_KEYS:
        if key in tr:
            overrides[key] = tr[key]
    settings = TrainSettings.from_dict(dict(training or {}), **overrides)
    ds = load_split(dataset, "train")
    examples, dropped = encode_split(tok, ds, settings.max_length)
    meter.record("dropped_over_max_length", dropped)
    if not examples:
        raise ValueError(f"dataset {dataset!r}: every example exceeds training.max_length={settings.max_length}")
    model = init_model_from_arch(arch, tok, seed)
    meter.record("parameters", count_parameters(model))
    out = Path(out_dir)
    work = out.with_name(f".{out.name}.train")
    summary = train_student(model=model, tokenizer=tok, examples=examples, settings=settings, seed=seed,
                            output_dir=work, meter=meter, fingerprint_extra={"role": "teacher"})
    replace_dir(work / "final", out)
    os.replace(work / "train_log.json", out / "train_log.json")
    shutil.rmtree(work, ignore_errors=True)
    return {"trained_tokens": summary["trained_tokens"], "final_loss": summary["final_loss"]}


def init_student(*, meter, out_dir: str, student: Mapping[str, Any], seed: int,
                 tokenizer: str | None = None) -> dict[str, Any]:
    """'scratch': a fresh model from student.arch saved with the run's ``tokenizer``; 'pretrained': model_ref.json
    pointer to the model and its own tokenizer (or ``student['tokenizer']``)."""
    init = student.get("init", "scratch")
    if init == "scratch":
        if not student.get("arch"):
            raise ValueError("students.<name>.arch is required when init is 'scratch'")
        if not tokenizer:
            raise ValueError("init_student: a student built from students.<name>.arch needs the run's tokenizer")
        tok = load_tokenizer(tokenizer)
        model = init_model_from_arch(student["arch"], tok, seed)
        save_model_dir(model, out_dir, tok)
        params = count_parameters(model)
        meter.record("vocab_hash", vocab_hash(tok))
    elif init == "pretrained":
        info = _pointer_dir(out_dir, student, "student", load_tokenizer(tokenizer) if tokenizer else None, tokenizer)
        for key in ("vocab_hash", "vocabulary_hash", "tokenizer", "tokenizer_size", "embedding_rows"):
            meter.record(key, info[key])
        params = _param_count_from_config(student["name_or_path"])
    else:
        raise ValueError(f"students.<name>.init must be 'scratch' or 'pretrained', got {init!r}")
    if params is not None:
        meter.record("parameters", params)
    meter.record("init", init)
    return {"parameters": params}
