"""Real-dataset preprocessors: Tulu-3 SFT mixture, OpenR1-Math, Codeforces CoTs, GSM8K -> the common record schema.

Why one pipeline for all three: the fair comparison needs every dataset to come out in the same shape (prompt,
response, answer-or-null, source) with the same deterministic subsampling, the same length rule (the chat-templated
prompt+response of the configured tokenizer must fit ``max_length``) and the same disjoint train/eval carve-out.

Steps: load (HF hub id, or a local parquet/jsonl/json/arrow file, a directory of such files, or a ``save_to_disk``
directory) -> permute the source rows with ``seed`` -> map each row to a record (dropping rows that lack a usable
exchange, counted per reason) -> optional length filter -> dedupe by normalised prompt -> the first ``n_eval`` kept
rows form eval, the next ``n_train`` form train. Rows are processed in chunks and reading stops once both splits are
full, so only as much of a large source is tokenised as needed. Every drop is counted in the returned stats.

Column mapping (documented choices):

* ``tulu3`` (allenai/tulu-3-sft-mixture): ``messages`` = list of {role, content}. Prompt = first ``user`` turn
  (system turns before it are ignored), response = the turn right after it when its role is ``assistant``; rows
  without that pair are dropped (``no_exchange``). Later turns are cut (counted as ``multi_turn_truncated``). id = ``id``.
* ``openr1_math`` (open-r1/OpenR1-Math-220k): prompt = ``problem``, response = ``solution``, answer = ``answer``;
  fallbacks when a column is absent or empty: prompt/response from ``messages``, response from the first of
  ``generations``. id = ``uuid``.
* ``codeforces_cots`` (open-r1/codeforces-cots): prompt = ``prompt`` (else first user turn of ``messages``), response =
  ``generation`` (else the assistant turn of ``messages``); answer = null (programs are not exact-match checkable).
  Rows whose ``finish_reason`` is present and not ``stop`` are truncated generations and are dropped (``unfinished``).
  id = ``id`` (made unique by suffixing the source row index when repeated).
* ``gsm8k`` (openai/gsm8k, config ``main``): prompt = ``question``, response = ``answer`` as published (the worked
  solution with its ``<<a*b=c>>`` calculator annotations and the final ``#### N`` line, the layout lm-eval's gsm8k
  task scores against), answer = the text after ``#### `` (rows without that line are dropped: ``no_final_answer``).
  id = ``gsm8k-<split>-<row>``. With ``eval_split`` (``test`` for GSM8K) the eval rows come from that split and
  train rows whose prompt also appears in eval are dropped (``eval_overlap``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import datasets
import numpy as np

from distill_bench.data.task import RECORD_FEATURES, normalize_prompt
from distill_bench.refs import missing_local_path

FAMILIES = ("tulu3", "openr1_math", "codeforces_cots", "gsm8k")
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow", ".csv": "csv"}
_TRUE = {"1", "true", "yes", "on"}
_CHUNK = 2048


class DataSourceError(ValueError):
    """A source is unusable: a missing column, an empty result after filtering, a missing split."""


class OfflineSourceError(RuntimeError):
    """A hub dataset was requested while HF offline mode is on and it is not available locally."""


# ----------------------------------------------------------------------------------------------------- loading

def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _looks_local(path: str) -> bool:
    """A path that can't be a hub id (``owner/name`` or ``name``): distill_bench.refs has the one rule."""
    return missing_local_path(path) or Path(path).suffix.lower() in _FILE_BUILDERS


def _pick_split(obj: Any, split: str, where: str) -> datasets.Dataset:
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataSourceError(f"{where} has no split {split!r}; available: {sorted(obj)}")
        return obj[split]
    return obj


def load_source(path: str, *, dataset_name: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """Load one split of a source as a ``datasets.Dataset``; clear errors for missing paths and offline hub ids."""
    key = f"datasets.{dataset_name}.path"
    if not path or not isinstance(path, str):
        raise DataSourceError(f"{key} must name an HF hub dataset id or a local path, got {path!r}")
    local = Path(path).expanduser()
    if local.exists():
        where = f"{local} ({key})"
        if local.is_file():
            builder = _FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataSourceError(f"{where}: unsupported file type {local.suffix!r}; "
                                      f"use one of {sorted(_FILE_BUILDERS)} or a save_to_disk directory")
            # a single data file is one split; the configured split name does not apply to it
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            return _pick_split(datasets.load_from_disk(str(local)), split, where)
        try:
            return datasets.load_dataset(str(local), name=subset, split=split)
        except ValueError as exc:  # e.g. unknown split of a local data-file folder
            raise DataSourceError(f"{where}: cannot load split {split!r}: {exc}") from exc
    if _looks_local(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist (set {key} to an existing local "
                                f"file/directory or an HF hub dataset id)")
    if _offline():
        from datasets import config as ds_config

        hint = (f"{key} = {path!r} is not a local path and HF offline mode is on "
                f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE); point {key} at a local copy "
                f"(parquet/jsonl/arrow or a save_to_disk directory)")
        if not ds_config.HF_HUB_OFFLINE:
            # offline was requested after `datasets` was imported: trying the hub could hang on the network
            raise OfflineSourceError(hint)
        try:  # the library is in offline mode: only the local HF cache is consulted
            return datasets.load_dataset(path, name=subset, split=split)
        except Exception as exc:  # noqa: BLE001 - any cache miss gets the same actionable message
            raise OfflineSourceError(f"{hint}; not found in the local HF cache ({type(exc).__name__}: {exc})") from exc
    return datasets.load_dataset(path, name=subset, split=split)


# ----------------------------------------------------------------------------------------------------- mapping

def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _first_exchange(messages: Any) -> tuple[str, str, bool] | None:
    """(first user turn, the assistant turn right after it, whether more turns follow) or None."""
    if not isinstance(messages, (list, tuple)):
        return None
    for i, msg in enumerate(messages):
        if isinstance(msg, Mapping) and msg.get("role") == "user":
            if i + 1 < len(messages) and isinstance(messages[i + 1], Mapping) \
                    and messages[i + 1].get("role") == "assistant":
                return _text(msg.get("content")), _text(messages[i + 1].get("content")), i + 2 < len(messages)
            return None
    return None


# A mapper returns (prompt, response, answer, source_id, flags) or a drop reason (str).


def _map_tulu3(row: Mapping[str, Any]):
    ex = _first_exchange(row.get("messages"))
    if ex is None:
        return "no_exchange"
    prompt, response, more = ex
    if not prompt or not response:
        return "empty_text"
    return prompt, response, None, row.get("id"), ("multi_turn_truncated",) if more else ()


def _map_openr1_math(row: Mapping[str, Any]):
    ex = _first_exchange(row.get("messages"))
    prompt = _text(row.get("problem")) or (ex[0] if ex else "")
    response = _text(row.get("solution")) or (ex[1] if ex else "")
    if not response and isinstance(row.get("generations"), (list, tuple)) and row["generations"]:
        response = _text(row["generations"][0])
    if not prompt or not response:
        return "empty_text"
    raw = row.get("answer")
    answer = (raw.strip() if isinstance(raw, str) else "" if raw is None else str(raw)) or None
    return prompt, response, answer, row.get("uuid"), ()


def _map_codeforces_cots(row: Mapping[str, Any]):
    finish = row.get("finish_reason")
    if isinstance(finish, str) and finish and finish != "stop":
        return "unfinished"
    ex = _first_exchange(row.get("messages"))
    prompt = _text(row.get("prompt")) or (ex[0] if ex else "")
    response = _text(row.get("generation")) or (ex[1] if ex else "")
    if not prompt or not response:
        return "empty_text"
    return prompt, response, None, row.get("id"), ()


GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def _map_gsm8k(row: Mapping[str, Any]):
    prompt, response = _text(row.get("question")), _text(row.get("answer"))
    if not prompt or not response:
        return "empty_text"
    match = GSM8K_FINAL.search(response)
    if match is None or not match.group(1).strip():
        return "no_final_answer"
    return prompt, response, match.group(1).strip(), None, ()


# family -> (mapper, required column groups: each group needs at least one of its columns, optional columns)
_MAPPERS: dict[str, tuple[Callable, tuple[tuple[str, ...], ...], tuple[str, ...]]] = {
    "tulu3": (_map_tulu3, (("messages",),), ("id",)),
    "openr1_math": (_map_openr1_math, (("problem", "messages"), ("solution", "messages", "generations")),
                    ("answer", "uuid")),
    "codeforces_cots": (_map_codeforces_cots, (("prompt", "messages"), ("generation", "messages")),
                        ("id", "finish_reason")),
    "gsm8k": (_map_gsm8k, (("question",), ("answer",)), ()),
}


def _check_columns(ds: datasets.Dataset, family: str, where: str) -> list[str]:
    """Columns the mapper reads; raise naming the missing column and the source when a required one is absent."""
    _, required, optional = _MAPPERS[family]
    have = set(ds.column_names)
    for group in required:
        if not have & set(group):
            need = repr(group[0]) if len(group) == 1 else " or ".join(map(repr, group))
            raise DataSourceError(f"{where} has no column {need}, required by the {family} preprocessor; "
                                  f"its columns are {sorted(have)}")
    wanted = {c for group in required for c in group} | set(optional)
    return sorted(wanted & have)


# ----------------------------------------------------------------------------------------------------- length

def chat_token_lengths(tokenizer: Any, prompts: list[str], responses: list[str]) -> list[int]:
    """Exact token count of each chat-templated (user prompt, assistant response) pair, as training will see it."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataSourceError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; "
                              f"the length filter needs one (set tokenizer.chat_template or drop max_length)")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                           tokenize=False)
             for p, r in zip(prompts, responses)]
    # the rendered template already carries any BOS/EOS it wants
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------------------------------------------- pipeline

def _empty_error(dataset_name: str, where: str, stats: dict[str, Any], max_length: int | None) -> DataSourceError:
    counts = ", ".join(f"{k}={v}" for k, v in sorted(stats["dropped"].items()) if v)
    if stats["mapped"] == 0:
        reasons = [k for k in ("no_exchange", "empty_text", "unfinished", "no_final_answer") if stats["dropped"].get(k)]
        what = (f"the record mapping filter ({'/'.join(reasons) or 'no rows read'}) removed every row: "
                "none has a usable prompt/response pair")
    elif stats["length_ok"] == 0:
        what = (f"the length filter datasets.{dataset_name}.max_length={max_length} removed every row "
                f"(all {stats['mapped']} chat-templated prompt+response pairs are longer)")
    else:
        what = "no rows were kept"
    return DataSourceError(f"dataset {dataset_name!r} from {where} is empty after filtering: {what} "
                           f"[rows read={stats['rows_read']}; dropped: {counts or 'none'}]")


def records_from_source(ds: datasets.Dataset, *, family: str, dataset_name: str, seed: int, n_eval: int,
                        n_train: int | None, tokenizer: Any = None, max_length: int | None = None,
                        where: str | None = None, source_split: str = "train",
                        exclude_prompts: set[str] | None = None) -> tuple[datasets.DatasetDict, dict]:
    """Map, filter, dedupe and carve a loaded source into (DatasetDict(train, eval), stats). See module docstring."""
    if family not in _MAPPERS:
        raise DataSourceError(f"datasets.{dataset_name}.source: unknown family {family!r}; known: {FAMILIES}")
    where = where or f"source of dataset {dataset_name!r}"
    for name, value in (("n_eval", n_eval), ("n_train", n_train)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise DataSourceError(f"datasets.{dataset_name}.{name} must be a non-negative integer, got {value!r}")
    if max_length is not None and tokenizer is None:
        raise DataSourceError(f"datasets.{dataset_name}.max_length={max_length} needs a tokenizer to count tokens")
    columns = _check_columns(ds, family, where)
    mapper = _MAPPERS[family][0]
    ds = ds.select_columns(columns)  # never decode heavy unused columns (e.g. OpenR1 generations)
    order = np.random.default_rng(seed).permutation(len(ds))
    wanted = n_eval + (n_train if n_train is not None else len(ds))

    stats: dict[str, Any] = {"family": family, "rows_in_source": len(ds), "rows_read": 0, "mapped": 0,
                             "length_ok": 0, "kept": 0, "multi_turn_truncated": 0,
                             "dropped": {"no_exchange": 0, "empty_text": 0, "unfinished": 0, "no_final_answer": 0,
                                         "max_length": 0, "duplicate_prompt": 0, "eval_overlap": 0}}
    kept: list[dict[str, Any]] = []
    seen_prompts: set[str] = set()
    seen_ids: set[str] = set()
    for start in range(0, len(order), _CHUNK):
        if len(kept) >= wanted:
            break
        idx = order[start:start + _CHUNK]
        batch = ds.select(idx)
        cands = []
        for src_index, row in zip(idx.tolist(), batch):
            stats["rows_read"] += 1
            out = mapper(row)
            if isinstance(out, str):
                stats["dropped"][out] += 1
                continue
            stats["mapped"] += 1
            cands.append((src_index, out))
        if tokenizer is not None and max_length is not None and cands:
            lengths = chat_token_lengths(tokenizer, [c[1][0] for c in cands], [c[1][1] for c in cands])
        else:
            lengths = [None] * len(cands)
        for (src_index, (prompt, response, answer, src_id, flags)), n_tok in zip(cands, lengths):
            if len(kept) >= wanted:
                break
            if n_tok is not None and n_tok > max_length:
                stats["dropped"]["max_length"] += 1
                continue
            stats["length_ok"] += 1
            key = normalize_prompt(prompt)
            if exclude_prompts and key in exclude_prompts:
                stats["dropped"]["eval_overlap"] += 1
                continue
            if key in seen_prompts:
                stats["dropped"]["duplicate_prompt"] += 1
                continue
            seen_prompts.add(key)
            rid = str(src_id) if src_id not in (None, "") else f"{dataset_name}-{source_split}-{src_index}"
            if rid in seen_ids:
                rid = f"{rid}-{src_index}"
            seen_ids.add(rid)
            stats["multi_turn_truncated"] += "multi_turn_truncated" in flags
            kept.append({"id": rid, "prompt": prompt, "response": response, "answer": answer, "source": family})
    stats["kept"] = len(kept)
    if not kept:
        raise _empty_error(dataset_name, where, stats, max_length)
    eval_rows, train_rows = kept[:n_eval], kept[n_eval:]
    if not train_rows and n_train != 0:
        raise DataSourceError(f"dataset {dataset_name!r} from {where}: only {len(kept)} usable rows after filtering, "
                              f"all taken by datasets.{dataset_name}.n_eval={n_eval}; nothing left for train")
    if n_eval and len(eval_rows) < n_eval:
        raise DataSourceError(f"dataset {dataset_name!r} from {where}: only {len(eval_rows)} usable rows, fewer than "
                              f"datasets.{dataset_name}.n_eval={n_eval}")
    stats["n_eval"], stats["n_train"] = len(eval_rows), len(train_rows)
    stats["train_short_by"] = 0 if n_train is None else n_train - len(train_rows)
    return datasets.DatasetDict({"train": _to_dataset(train_rows), "eval": _to_dataset(eval_rows)}), stats


def _to_dataset(rows: Iterable[dict[str, Any]]) -> datasets.Dataset:
    rows = list(rows)
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in RECORD_FEATURES}, features=RECORD_FEATURES)


def preprocess(*, family: str, path: str, dataset_name: str, seed: int, n_eval: int, n_train: int | None = None,
               split: str = "train", subset: str | None = None, tokenizer: Any = None,
               max_length: int | None = None, eval_split: str | None = None
               ) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Load ``path`` (hub id or local) and turn it into the common-schema DatasetDict plus filter statistics.

    ``eval_split`` (e.g. GSM8K's ``test``): eval rows come from that split of the source, train rows from ``split``
    (minus any prompt that is also in eval); otherwise both are carved, disjoint, out of ``split``.
    """
    if family not in _MAPPERS:
        raise DataSourceError(f"datasets.{dataset_name}.source: unknown family {family!r}; known: {FAMILIES}")
    where = f"{path!r} (datasets.{dataset_name}.path)"
    ds = load_source(path, dataset_name=dataset_name, split=split, subset=subset)
    common = dict(family=family, dataset_name=dataset_name, seed=seed, tokenizer=tokenizer, max_length=max_length)
    if not eval_split or eval_split == split:
        return records_from_source(ds, n_eval=n_eval, n_train=n_train, where=where, source_split=split, **common)
    if Path(path).expanduser().is_file():
        raise DataSourceError(f"datasets.{dataset_name}.eval_split={eval_split!r} needs a source with splits "
                              f"(a hub id or a directory of per-split files), but {path!r} is one file")
    held_out = load_source(path, dataset_name=dataset_name, split=eval_split, subset=subset)
    eval_dsd, eval_stats = records_from_source(held_out, n_eval=n_eval, n_train=0, where=f"{where} split "
                                               f"{eval_split!r}", source_split=eval_split, **common)
    exclude = {normalize_prompt(p) for p in eval_dsd["eval"]["prompt"]}
    train_dsd, stats = records_from_source(ds, n_eval=0, n_train=n_train, where=f"{where} split {split!r}",
                                           source_split=split, exclude_prompts=exclude, **common)
    for reason, count in eval_stats["dropped"].items():
        stats["dropped"][reason] += count
    for key in ("rows_in_source", "rows_read", "mapped", "length_ok", "kept"):
        stats[key] += eval_stats[key]
    stats["n_eval"], stats["eval_split"] = eval_stats["n_eval"], eval_split
    return datasets.DatasetDict({"train": train_dsd["train"], "eval": eval_dsd["eval"]}), stats
