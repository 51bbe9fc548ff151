"""`cache_logits` stage: one teacher pass over the KD corpus -> top-k logit cache (teacher-side cost).

The corpus is the dataset's train split encoded exactly as the student trainer encodes it
(`encode_prompt_response`, same max_length), so cached rows line up with the student's loss-bearing positions.
Examples are length-bucketed (sorted by length, minimal padding), the LM head is applied only to loss-bearing
positions, and only those are stored.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from distill_bench.kd.cache import (CacheMismatchError, CacheReader, CacheWriter, check_disk_space, corpus_hash,
                                    estimate_cache_bytes, example_hash, iter_shard_sizes, loss_positions,
                                    value_entry_bytes, id_encoding_for, id_row_bytes, write_tail_dir)
from distill_bench.defaults import section_defaults
from distill_bench.train.head import head_is_plain
from distill_bench.data.io import load_dataset_dir
from distill_bench.models.tokenizer import encode_prompt_response, load_tokenizer, vocab_hash
from distill_bench.models.vocab import vocabulary_hash

if TYPE_CHECKING:   # annotations only: torch is imported inside the functions, so resolving the stage stays light
    import torch

log = logging.getLogger(__name__)

KD_DEFAULTS = section_defaults("kd")   # the schema's `kd` section

SHARD_RAM_BYTES = 1 << 30        # cap on un-encoded rows held per shard before it is written
CHUNK_ELEMENTS = 1 << 27         # positions x vocab per LM-head / top-k chunk (512 MiB float32; +39 % cache
                                 # throughput over 64 MiB chunks on an H100, docs/BENCHMARKS.md)


def _no_grad(fn):
    """torch.no_grad() without importing torch when this module is imported (the stage registry resolves it)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def cache_temperatures(kd: Mapping[str, Any]) -> list[float]:
    """1.0 first, then kd.cache_temperatures and kd.temperature (deduplicated, in that order)."""
    temps = [1.0]
    extra = list(kd.get("cache_temperatures") or []) + [kd.get("temperature", KD_DEFAULTS["temperature"])]
    for t in extra:
        t = float(t)
        if t <= 0:
            raise ValueError(f"kd.cache_temperatures: temperature {t} must be positive")
        if all(abs(t - u) > 1e-9 for u in temps):
            temps.append(t)
    return temps


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def id_space(tokenizer) -> int:
    """1 + the largest id the tokenizer can produce (its length, unless its ids have gaps)."""
    return max(len(tokenizer), 1 + max(tokenizer.get_vocab().values()))


def real_vocab_size(model, tokenizer_size: int | None) -> int:
    """Ids the cache may hold: the tokenizer's, when the embedding matrix is padded beyond it (Qwen2.5-7B: 152064
    rows, 151665 tokens). Pad rows are no token: they are cut from the softmax, so no id past the tokenizer is ever
    cached and the student, whose matrix may be padded differently, is compared over real tokens only."""
    rows = _vocab_size(model)
    if tokenizer_size is None:
        return rows
    if int(tokenizer_size) > rows:
        raise ValueError(f"the teacher has {rows} output rows but its tokenizer {int(tokenizer_size)} tokens: "
                         f"they were not built together")
    return int(tokenizer_size)


@_no_grad
def _topk_rows(z: torch.Tensor, k: int, temperatures: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """[c, V] logits -> top-k ids, top-k log-probs at tau=1, [c, T] tail logits log sum_tail exp(l/tau)."""
    import torch

    z = z.float()
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    vals, ids = torch.topk(logp, k, dim=-1, sorted=True)
    tails = []
    for tau in temperatures:
        scaled = logp / tau if tau != 1.0 else logp.clone()
        scaled.scatter_(1, ids, -math.inf)
        tails.append(torch.logsumexp(scaled, dim=-1))
    return ids, vals, torch.stack(tails, dim=1)


@_no_grad
def _loss_position_logits(model, batch: Sequence[Mapping[str, Any]], *, pad_token_id: int, device: torch.device,
                          head_only: bool | None):
    """Teacher forward on one right-padded batch: (logits of loss positions s..e as a function, n, per-example
    counts), the LM head applied only to the loss positions when the model allows it."""
    import torch

    lengths = [len(ex["input_ids"]) for ex in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), int(pad_token_id), dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, counts = [], [], []
    for b, ex in enumerate(batch):
        input_ids[b, :lengths[b]] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attn[b, :lengths[b]] = 1
        pos = loss_positions(ex["completion_mask"]) - 1          # teacher reads position i-1 for label i
        rows.append(np.full(len(pos), b))
        cols.append(pos)
        counts.append(len(pos))
    rows_t = torch.as_tensor(np.concatenate(rows), dtype=torch.long, device=device)
    cols_t = torch.as_tensor(np.concatenate(cols), dtype=torch.long, device=device)
    input_ids, attn = input_ids.to(device), attn.to(device)
    if head_only is None:
        head_only = head_is_plain(model)
    if head_only:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attn, use_cache=False).last_hidden_state
        hidden = hidden[rows_t, cols_t]                           # [N, H]: loss positions only
        head = model.get_output_embeddings()
        source = lambda s, e: head(hidden[s:e])                  # noqa: E731
    else:
        logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
        source = lambda s, e: logits[rows_t[s:e], cols_t[s:e]]   # noqa: E731
    return source, int(rows_t.numel()), counts


@_no_grad
def teacher_topk(model, batch: Sequence[Mapping[str, Any]], *, k: int, temperatures: Sequence[float],
                 pad_token_id: int, device: torch.device, head_only: bool | None = None,
                 vocab_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Teacher forward on one right-padded batch; per example (ids, log-probs, tail) at its loss positions only.
    ``vocab_size``: the tokenizer's id space; output rows beyond it (a padded embedding matrix) are cut."""
    import torch

    source, n, counts = _loss_position_logits(model, batch, pad_token_id=pad_token_id, device=device,
                                              head_only=head_only)
    vocab = _vocab_size(model) if vocab_size is None else int(vocab_size)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    out_ids, out_vals, out_tail = [], [], []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = source(s, e)
        ids, vals, tail = _topk_rows(z[:, :vocab] if vocab < z.shape[-1] else z, k, temperatures)
        out_ids.append(ids.to("cpu", torch.int32))
        out_vals.append(vals.cpu())
        out_tail.append(tail.cpu())
    ids = torch.cat(out_ids).numpy() if out_ids else np.zeros((0, k), np.int32)
    vals = torch.cat(out_vals).numpy() if out_vals else np.zeros((0, k), np.float32)
    tail = torch.cat(out_tail).numpy() if out_tail else np.zeros((0, len(temperatures)), np.float32)
    result, start = [], 0
    for c in counts:
        result.append((ids[start:start + c], vals[start:start + c], tail[start:start + c]))
        start += c
    return result


def build_cache(model, encoded: Sequence[Mapping[str, Any] | None], out_dir: str | os.PathLike, *, k: int,
                value_dtype: str, temperatures: Sequence[float], batch_size: int, pad_token_id: int,
                n_shards: int = 1, meta: Mapping[str, Any] | None = None, device: torch.device | str | None = None,
                tokenizer_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Teacher pass over ``encoded`` (None = example dropped) and atomic cache write; returns (manifest, stats).

    The disk-space check runs before the first forward pass. ``tokenizer_size``: the teacher tokenizer's length;
    output rows beyond it (a padded embedding matrix) are excluded from the distribution (``real_vocab_size``).
    """
    import torch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = real_vocab_size(model, tokenizer_size)
    k = int(k)
    if not 1 <= k <= vocab:
        raise ValueError(f"kd.top_k={k} must be between 1 and the teacher vocabulary size {vocab}")
    value_entry_bytes(value_dtype)
    temps = [float(t) for t in temperatures]
    counts = [0 if ex is None else len(loss_positions(ex["completion_mask"])) for ex in encoded]
    n_positions = sum(counts)
    if n_positions == 0:
        raise ValueError("KD corpus has no loss-bearing positions (every example dropped or empty)")
    estimate = estimate_cache_bytes(n_positions, len(encoded), k=k, value_dtype=value_dtype, vocab_size=vocab,
                                    n_temperatures=len(temps))
    check_disk_space(out_dir, estimate)

    # shards: contiguous example ranges, more than asked when one shard's raw rows would exceed SHARD_RAM_BYTES
    raw_per_pos = k * 8 + 4 * len(temps)
    max_pos_per_shard = max(1, SHARD_RAM_BYTES // raw_per_pos)
    n_shards = max(1, int(n_shards), math.ceil(n_positions / max_pos_per_shard))
    n_shards = min(n_shards, len(encoded))
    bounds = np.linspace(0, len(encoded), n_shards + 1).round().astype(int)

    model.eval()
    writer = CacheWriter(out_dir, k=k, value_dtype=value_dtype, vocab_size=vocab, temperatures=temps)
    input_tokens = padded_tokens = batches = 0
    head_only = head_is_plain(model)
    try:
        for si in range(n_shards):
            lo, hi = int(bounds[si]), int(bounds[si + 1])
            rows: list[Any] = [None] * (hi - lo)
            order = sorted((i for i in range(lo, hi) if encoded[i] is not None and counts[i] > 0),
                           key=lambda i: len(encoded[i]["input_ids"]), reverse=True)
            for bs in range(0, len(order), int(batch_size)):
                idx = order[bs:bs + int(batch_size)]
                batch = [encoded[i] for i in idx]
                for i, res in zip(idx, teacher_topk(model, batch, k=k, temperatures=temps, pad_token_id=pad_token_id,
                                                    device=device, head_only=head_only, vocab_size=vocab)):
                    ex = encoded[i]
                    rows[i - lo] = (example_hash(ex["input_ids"], ex["completion_mask"]), *res)
                lens = [len(ex["input_ids"]) for ex in batch]
                input_tokens += sum(lens)
                padded_tokens += max(lens) * len(lens) - sum(lens)
                batches += 1
            for i in range(lo, hi):   # kept examples without loss positions still get their hash
                if rows[i - lo] is None and encoded[i] is not None:
                    ex = encoded[i]
                    rows[i - lo] = (example_hash(ex["input_ids"], ex["completion_mask"]),
                                    np.zeros((0, k), np.int32), np.zeros((0, k), np.float32),
                                    np.zeros((0, len(temps)), np.float32))
            writer.add_shard(rows)
            log.info("kd cache: shard %d/%d written (%d examples)", si + 1, n_shards, hi - lo)
        full_meta = {**dict(meta or {}), "corpus_hash": corpus_hash(encoded), "input_tokens": input_tokens,
                     "dropped_examples": sum(ex is None for ex in encoded)}
        manifest = writer.finalize(full_meta)
    except BaseException:
        writer.abort()
        raise
    stats = {"input_tokens": input_tokens, "padded_tokens": padded_tokens, "cached_positions": n_positions,
             "batches": batches, "n_shards": n_shards, "estimated_bytes": estimate,
             "head_only_positions": head_only}
    return manifest, stats


@_no_grad
def teacher_tails(model, batch: Sequence[Mapping[str, Any]], cached_ids: Sequence[np.ndarray], *, temperature: float,
                  pad_token_id: int, device: torch.device, head_only: bool | None = None,
                  vocab_size: int | None = None) -> list[np.ndarray]:
    """Per example, the exact full-vocabulary tail at ``temperature`` of its loss positions: log sum over the ids
    outside the cached top-k (``cached_ids[b]``, [n_b, k]) of exp(l_j / tau), l the teacher's log-probs.
    ``vocab_size``: the cache's id space (output rows beyond a tokenizer are cut there too)."""
    import torch

    source, n, counts = _loss_position_logits(model, batch, pad_token_id=pad_token_id, device=device,
                                              head_only=head_only)
    if [len(c) for c in cached_ids] != counts:
        raise CacheMismatchError(f"cached positions {[len(c) for c in cached_ids]} differ from the corpus' loss "
                                 f"positions {counts}: the cache was built on another corpus")
    ids_all = torch.as_tensor(np.concatenate(list(cached_ids)) if n else np.zeros((0, 1), np.int64),
                              dtype=torch.long, device=device)
    vocab = _vocab_size(model) if vocab_size is None else int(vocab_size)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    out = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = source(s, e).float()
        z = z[:, :vocab] if vocab < z.shape[-1] else z
        scaled = (z - torch.logsumexp(z, dim=-1, keepdim=True)) / float(temperature)
        scaled.scatter_(1, ids_all[s:e], -math.inf)
        out.append(torch.logsumexp(scaled, dim=-1).cpu())
    tail = torch.cat(out).numpy() if out else np.zeros((0,), np.float32)
    result, start = [], 0
    for c in counts:
        result.append(tail[start:start + c])
        start += c
    return result


def build_tail(model, encoded: Sequence[Mapping[str, Any] | None], cache_dir: str | os.PathLike,
               out_dir: str | os.PathLike, *, temperature: float, batch_size: int, pad_token_id: int,
               meta: Mapping[str, Any] | None = None, device: torch.device | str = "cpu"
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One teacher pass over the cache's corpus computing only the tail column at ``temperature`` (same length-sorted
    batching as the cache); written as its own artifact next to the cache (``write_tail_dir``)."""
    import torch

    reader = CacheReader(cache_dir, verify=True)
    manifest = reader.manifest
    if corpus_hash(encoded) != manifest.get("corpus_hash"):
        raise CacheMismatchError(f"the encoded corpus differs from the one the logit cache {str(cache_dir)!r} was "
                                 "built on (dataset, tokenizer or max_length changed); rebuild the cache first")
    device = torch.device(device)
    model.eval()
    head_only = head_is_plain(model)
    shard_tails, input_tokens, batches = [], 0, 0
    for shard in manifest["shards"]:
        lo, hi = int(shard["first_example"]), int(shard["first_example"]) + int(shard["n_examples"])
        per_example: dict[int, np.ndarray] = {}
        order = sorted((i for i in range(lo, hi) if encoded[i] is not None and reader.n_positions(i) > 0),
                       key=lambda i: len(encoded[i]["input_ids"]), reverse=True)
        for bs in range(0, len(order), int(batch_size)):
            idx = order[bs:bs + int(batch_size)]
            batch = [encoded[i] for i in idx]
            tails = teacher_tails(model, batch, [reader.get(i).ids for i in idx], temperature=temperature,
                                  pad_token_id=pad_token_id, device=device, head_only=head_only,
                                  vocab_size=int(manifest["vocab_size"]))
            per_example.update(zip(idx, tails))
            input_tokens += sum(len(ex["input_ids"]) for ex in batch)
            batches += 1
        parts = [per_example[i] for i in range(lo, hi) if i in per_example]
        shard_tails.append(np.concatenate(parts) if parts else np.zeros((0,), np.float32))
    tail_manifest = write_tail_dir(out_dir, manifest, temperature, shard_tails, meta)
    return tail_manifest, {"input_tokens": input_tokens, "tail_positions": int(manifest["n_positions"]),
                           "batches": batches}


def check_top_k_fits(k: int, vocab_size: int, tokenizer: str) -> None:
    """kd.top_k against the tokenizer's real vocabulary, before the teacher is loaded."""
    if not 1 <= int(k) <= int(vocab_size):
        raise ValueError(f"config key 'kd.top_k': {k} exceeds the {vocab_size} tokens of tokenizer {tokenizer!r} "
                         f"(top-k must lie in [1, vocabulary size])")


def _load_teacher(ref: str, device: torch.device):
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    try:
        from distill_bench.models.build import load_model
    except ImportError:  # models module not present: plain HF loading
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ref, **({"dtype": dtype} if dtype else {}))
        return model.to(device)
    return load_model(ref, dtype=dtype, device=device)


def cache_logits(*, meter, teacher: str, tokenizer: str, dataset: str, out_dir: str, kd: Mapping[str, Any],
                 training: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Stage: teacher top-k logit cache for the train split of ``dataset`` (see module docstring)."""
    import torch  # deferred on purpose: resolving the stage stays torch-free (harness overhead is metered)


    torch.manual_seed(int(seed))
    kd = {**KD_DEFAULTS, **dict(kd)}
    max_length = training.get("max_length")
    if max_length is None:
        raise KeyError("training.max_length is required by cache_logits (must equal the student's)")
    tok = load_tokenizer(tokenizer)
    check_top_k_fits(int(kd["top_k"]), id_space(tok), tokenizer)
    dsd = load_dataset_dir(dataset)
    if "train" not in dsd:
        raise KeyError(f"dataset {dataset!r} has no 'train' split")
    train = dsd["train"]
    encoded = [encode_prompt_response(tok, p, r, max_length) for p, r in zip(train["prompt"], train["response"])]
    try:
        from distill_bench.data.io import dataset_content_hash
        data_hash = dataset_content_hash(dataset)
    except Exception:  # noqa: BLE001 -- provenance only; the corpus hash below is what readers check
        data_hash = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_teacher(teacher, device)
    meter.set_primary_tokens("input_tokens")
    meter.mark_steady_state()   # the teacher is loaded: from here on the stage's tokens/s is the forward pass's
    k = int(kd["top_k"])
    value_dtype = str(kd["value_dtype"])
    temps = cache_temperatures(kd)
    meta = {"teacher": str(teacher), "tokenizer": str(tokenizer), "tokenizer_vocab_hash": vocab_hash(tok),
            "tokenizer_vocabulary_hash": vocabulary_hash(tok), "tokenizer_size": id_space(tok),
            "dataset": str(dataset), "dataset_content_hash": data_hash, "max_length": int(max_length),
            "teacher_dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    manifest, stats = build_cache(model, encoded, out_dir, k=k, value_dtype=value_dtype, temperatures=temps,
                                  batch_size=int(kd["batch_size"]), pad_token_id=int(tok.pad_token_id),
                                  n_shards=int(kd["cache_shards"]), meta=meta, device=device,
                                  tokenizer_size=id_space(tok))
    meter.add_tokens("input_tokens", stats["input_tokens"])
    meter.add_tokens("cached_positions", stats["cached_positions"])
    meter.set_primary_tokens("input_tokens")
    files = dict(iter_shard_sizes(out_dir))
    total_bytes = sum(files.values())
    vocab = manifest["vocab_size"]
    entry_bytes = value_entry_bytes(value_dtype) + id_row_bytes(id_encoding_for(vocab), k) / k
    for key, value in {
        "k": k, "value_dtype": value_dtype, "id_encoding": manifest["id_encoding"], "vocab_size": vocab,
        "cache_temperatures": temps, "bytes_per_position": manifest["bytes_per_position"],
        "bytes_per_entry": entry_bytes, "bytes_per_entry_incl_normalisers": manifest["bytes_per_position"] / k,
        "bytes_on_disk_per_position": total_bytes / max(1, stats["cached_positions"]),
        "cache_bytes": total_bytes, "n_shards": stats["n_shards"], "file_sizes": files,
        "padded_tokens_forwarded": stats["padded_tokens"], "dropped_examples": manifest["dropped_examples"],
        "n_examples": manifest["n_examples"],
    }.items():
        meter.record(key, value)
    return {"manifest": str(Path(out_dir) / "manifest.json"), **stats}


def cache_tail(*, meter, teacher: str, tokenizer: str, dataset: str, kd_cache: str, out_dir: str,
               kd: Mapping[str, Any], training: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Stage: the exact tail at one more temperature (``kd.temperature``) for an existing top-k cache, so adding a
    temperature to a KD sweep runs only this teacher pass, not a new cache."""
    import torch  # deferred on purpose: resolving the stage stays torch-free (harness overhead is metered)

    torch.manual_seed(int(seed))
    temperature = float(kd["temperature"])
    if temperature <= 0:
        raise ValueError(f"kd.temperature={temperature} must be positive")
    max_length = training.get("max_length")
    if max_length is None:
        raise KeyError("training.max_length is required by cache_tail (must equal the cache's)")
    tok = load_tokenizer(tokenizer)
    cache_manifest = CacheReader(kd_cache, verify=False).manifest
    if cache_manifest.get("tokenizer_vocab_hash") != vocab_hash(tok):
        raise CacheMismatchError(f"logit cache {kd_cache!r} was built with another tokenizer than {tokenizer!r}")
    train = load_dataset_dir(dataset)["train"]
    encoded = [encode_prompt_response(tok, p, r, max_length) for p, r in zip(train["prompt"], train["response"])]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_teacher(teacher, device)
    meta = {"teacher": str(teacher), "tokenizer": str(tokenizer), "dataset": str(dataset), "cache_dir": str(kd_cache),
            "max_length": int(max_length)}
    manifest, stats = build_tail(model, encoded, kd_cache, out_dir, temperature=temperature,
                                 batch_size=int(kd.get("batch_size", KD_DEFAULTS["batch_size"])),
                                 pad_token_id=int(tok.pad_token_id), meta=meta, device=device)
    meter.add_tokens("input_tokens", stats["input_tokens"])
    meter.add_tokens("tail_positions", stats["tail_positions"])
    meter.set_primary_tokens("input_tokens")
    meter.record("temperature", temperature)
    meter.record("tail_bytes", sum((Path(out_dir) / s["file"]).stat().st_size for s in manifest["shards"]))
    return {"manifest": str(Path(out_dir) / "manifest.json"), **stats}
