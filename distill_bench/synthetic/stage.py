"""Synthetic-data stages (teacher side): sharded generation (scatter) and filter + merge (gather).

Sharding. The prompts (the dataset's ``train`` split, optionally its first ``synthetic.n_prompts``) are cut into
fixed *chunks* of ``CHUNK_BATCHES`` generation batches (``batch_size // samples_per_prompt`` prompts per batch),
and shard ``i`` of ``N`` takes the contiguous chunk range ``[i*C//N, (i+1)*C//N)`` of the ``C`` chunks. Each chunk
is one ``generate`` call seeded with ``seed + chunk * CHUNK_BATCHES`` (the hf backend adds the batch number), so
a chunk's batches, padding and random stream never depend on the shard layout: merging the shards in shard order
gives exactly the unsharded output -- for greedy decoding, and for sampling with the hf backend too. (vLLM is
handed a whole shard in one call, since it schedules its own batches and builds its engine per call; its sampled
output is reproducible for a given layout, greedy output is layout-independent.) With more shards than chunks
some shards are empty, which is valid. The loop itself (chunks, seeds, checkpoints, metering) is
:mod:`distill_bench.generation.chunked`, shared with DPO sampling.

Resume. Completed chunks are checkpointed as JSON lines in ``<out_dir>.partial/`` (atomic writes); a rerun after
SIGTERM or a time-out reloads them when their fingerprint (every setting that changes the output) matches and
generates only the rest. The shard directory itself appears only when complete (temporary sibling + rename), with
``shard_info.json`` as the completion marker ``merge_shards`` checks.

Token accounting (exact, per sample, saved as columns): ``generated_tokens`` = real generated tokens up to and
including EOS; ``prompt_tokens`` = templated prompt tokens without padding. The stage charges
``generated_tokens`` (primary) and ``input_tokens`` = sum over samples of ``prompt_tokens`` (the prompt is
prefilled once per sample by ``num_return_sequences``) for the chunks generated in *this* attempt; resumed chunks
were charged to the attempt that produced them.

Context overflow. Prompts whose templated length exceeds the model's context minus ``max_new_tokens`` are dropped
(a left-truncated prompt would no longer match the question the response answers), counted and listed by id.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from distill_bench.artifacts import ChunkCheckpoint
from distill_bench.atomic import atomic_write_json, write_dir_atomically
from distill_bench.data.io import content_hash, dataset_hash_or_none, load_dataset_dir
from distill_bench.defaults import section_defaults
from distill_bench.generation import GenerationSettings, resolve_backend
from distill_bench.generation.chunked import (CHUNK_BATCHES, ChunkedRun, MeteredTokens, chunk_bounds, chunk_prompts,
                                             generate_chunks)
from distill_bench.generation.hf_backend import load_model
from distill_bench.generation.prompts import load_tokenizer
from distill_bench.synthetic.filters import apply_filters
from distill_bench.synthetic.ids import DECODING_DEFAULTS, generation_shard_key, normalize_filters

log = logging.getLogger(__name__)
PREFILL_DEFAULT = section_defaults("synthetic")["hf_prefill"]   # a kernel choice: not among the decoding keys

SHARD_INFO = "shard_info.json"
SYNTHETIC_INFO = "synthetic_info.json"
SUMMARY_FILE = "summary.json"   # what distill_bench.data.io.read_summary / dataset_content_hash read
COLUMNS = ("id", "prompt_id", "prompt", "response", "answer", "source", "sample_index", "prompt_tokens",
           "generated_tokens", "finished")


def _features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "prompt_id": datasets.Value("string"), "prompt": datasets.Value("string"),
        "response": datasets.Value("string"), "answer": datasets.Value("string"), "source": datasets.Value("string"),
        "sample_index": datasets.Value("int32"), "prompt_tokens": datasets.Value("int32"),
        "generated_tokens": datasets.Value("int32"), "finished": datasets.Value("bool"),
    })


def _decoding_settings(synthetic: Mapping[str, Any]) -> dict[str, Any]:
    """The generation fields of the synthetic section, config defaults filled, errors naming ``synthetic.<key>``."""

    d = {k: synthetic.get(k, v) for k, v in DECODING_DEFAULTS.items() if k != "n_prompts"}
    try:
        GenerationSettings.from_dict(d, where="synthetic")  # validates values with key paths
    except ValueError as e:
        raise ValueError(str(e)) from None
    return d


def shard_chunks(n_chunks: int, shard: int, num_shards: int) -> range:
    """Contiguous chunk range of shard ``shard`` of ``num_shards`` (concatenation over shards = all chunks)."""
    return range(shard * n_chunks // num_shards, (shard + 1) * n_chunks // num_shards)


def _load_source(dataset: str):

    return load_dataset_dir(dataset)


def _load_teacher(teacher: str, backend: str):
    """hf: load once and reuse across chunks (on the GPU when there is one); vllm: its engine loads the path."""
    if backend == "vllm":
        return teacher
    return load_model(teacher)


def generate_shard(*, meter: Any, teacher: str, tokenizer: str, dataset: str, out_dir: str,
                   synthetic: Mapping[str, Any], shard: int, num_shards: int, seed: int) -> dict[str, Any]:
    """Generate teacher responses for shard ``shard`` of ``num_shards``; write ``out_dir`` (a ``datasets.Dataset``
    plus ``shard_info.json``) atomically; return the shard info."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"synthetic.shards must be an integer >= 1, got {num_shards!r}")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be an integer in [0, {num_shards}), got {shard!r}")
    decoding = _decoding_settings(synthetic)
    n_limit = synthetic.get("n_prompts")
    if n_limit is not None and (isinstance(n_limit, bool) or not isinstance(n_limit, int) or n_limit < 1):
        raise ValueError(f"synthetic.n_prompts must be null or an integer >= 1, got {n_limit!r}")
    backend = resolve_backend(decoding["backend"])
    settings = GenerationSettings(
        backend=backend, batch_size=int(decoding["batch_size"]), max_new_tokens=int(decoding["max_new_tokens"]),
        temperature=float(decoding["temperature"]), top_p=float(decoding["top_p"]),
        num_samples=int(decoding["samples_per_prompt"]), seed=int(seed), prompt_overflow="drop",
        hf_decode=decoding["hf_decode"], hf_prefill=synthetic.get("hf_prefill", PREFILL_DEFAULT))

    train = _load_source(dataset)["train"]
    total = len(train) if n_limit is None else min(int(n_limit), len(train))
    per_chunk = chunk_prompts(settings)
    chunks = chunk_bounds(total, settings)
    mine = shard_chunks(len(chunks), shard, num_shards)
    shard_key = generation_shard_key(Path(dataset).name, synthetic, seed=seed)
    fingerprint = {
        "shard_key": shard_key, "teacher": str(teacher), "tokenizer": str(tokenizer), "dataset": str(dataset),
        "dataset_hash": dataset_hash_or_none(dataset), "decoding": decoding, "resolved_backend": backend,
        "n_prompts": total, "seed": int(seed), "chunk_prompts": per_chunk, "chunk_batches": CHUNK_BATCHES,
        "shard": shard, "num_shards": num_shards,
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    checkpoint = ChunkCheckpoint(partial, fingerprint)
    done = checkpoint.done

    rows = train.select(range(chunks[mine.start][0], chunks[mine.stop - 1][1])) if len(mine) else train.select([])
    offset = chunks[mine.start][0] if len(mine) else 0
    prompts, ids = list(rows["prompt"]), list(rows["id"])
    answers, sources = list(rows["answer"]), list(rows["source"])
    todo = [c for c in mine if c not in done]
    tokens = MeteredTokens(meter)
    meter.set_primary_tokens("generated_tokens")
    run = ChunkedRun()
    if todo:
        checkpoint.start()
        model = _load_teacher(teacher, backend)
        tok = tokenizer if backend == "vllm" else load_tokenizer(tokenizer)  # vLLM loads it from the path

        def row_of(i: int, r) -> dict[str, Any]:
            return {"prompt_index": offset + i, "id": f"{ids[i]}-s{r.sample_index}", "prompt_id": ids[i],
                    "prompt": prompts[i], "response": r.text.strip(), "answer": answers[i], "source": sources[i],
                    "sample_index": r.sample_index, "prompt_tokens": r.prompt_tokens,
                    "generated_tokens": r.generated_tokens, "finished": bool(r.finished), "dropped": bool(r.dropped)}

        # vLLM gets the whole shard in one call: it schedules its own continuous batches
        generate_chunks(model, tok, prompts, chunks=chunks, todo=todo, settings=settings,
                        seed_of=lambda c: int(seed) + c * CHUNK_BATCHES, row_of=row_of, checkpoint=checkpoint,
                        meter=meter, tokens=tokens, run=run, one_call=backend == "vllm", prompt_offset=offset)
        log.info("shard %d/%d: chunks %d..%d generated", shard, num_shards, todo[0], todo[-1])

    all_rows = [row for c in mine for row in done[c]]
    kept = [r for r in all_rows if not r["dropped"]]
    dropped_ids = sorted({r["prompt_id"] for r in all_rows if r["dropped"]})
    records = [{k: r[k] for k in COLUMNS} for r in kept]
    info = {
        "complete": True, "shard": shard, "num_shards": num_shards, "shard_key": shard_key,
        "fingerprint": fingerprint, "prompt_range": [offset, offset + len(prompts)], "chunks": [mine.start, mine.stop],
        "prompts": len(prompts), "prompts_dropped_too_long": len(dropped_ids), "dropped_prompt_ids": dropped_ids,
        "samples": len(records), "finished": sum(r["finished"] for r in records),
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        "input_tokens": sum(r["prompt_tokens"] for r in records),
        "resumed_chunks": len(mine) - len(todo),
        "attempt": {"generated_tokens": run.generated_tokens, "input_tokens": run.input_tokens,
                    "generate_s": round(run.generate_s, 6), "steady_state_tokens_per_s": tokens.tokens_per_s()},
    }
    _write_shard(out, records, info)
    shutil.rmtree(partial, ignore_errors=True)

    for kind in ("generated_tokens", "input_tokens"):
        meter.add_tokens(kind, 0)  # present (0) for an empty shard or one whose chunks were all resumed
    for key in ("prompts", "samples", "finished", "prompts_dropped_too_long", "resumed_chunks"):
        meter.record(key, info[key])
    meter.record("backend", backend)
    meter.record("shard", f"{shard}/{num_shards}")
    if tokens.tokens_per_s() is not None:
        meter.record("steady_state_tokens_per_s", tokens.tokens_per_s())
    if dropped_ids:
        log.warning("shard %d/%d: %d prompt(s) longer than the context were dropped", shard, num_shards,
                    len(dropped_ids))
    return info


def _write_shard(out: Path, records: list[dict], info: dict) -> None:
    import datasets

    def write(tmp: Path) -> None:
        ds = datasets.Dataset.from_list(records, features=_features()) if records else \
            datasets.Dataset.from_dict({k: [] for k in COLUMNS}, features=_features())
        # an empty Dataset saved with the default 0 shards cannot be loaded back (datasets 5.2): force one
        ds.save_to_disk(str(tmp / "data"), num_shards=None if records else 1)
        atomic_write_json(tmp / SHARD_INFO, info, sort_keys=True)  # the completion marker, written last

    write_dir_atomically(out, write)


def read_shard(path: str | os.PathLike) -> tuple[Any, dict]:
    """(records Dataset, shard info) of a finished shard; a missing/incomplete marker is an error naming it."""
    import datasets

    p = Path(path)
    marker = p / SHARD_INFO
    if not p.is_dir():
        raise FileNotFoundError(f"synthetic shard {p} does not exist (its generate_synthetic job has not run)")
    if not marker.is_file():
        raise FileNotFoundError(f"synthetic shard {p} is incomplete: no {SHARD_INFO} completion marker "
                                "(rerun its generate_synthetic job)")
    info = json.loads(marker.read_text())
    if not info.get("complete"):
        raise ValueError(f"synthetic shard {p}: {SHARD_INFO} does not mark the shard complete")
    return datasets.load_from_disk(str(p / "data")), info


def merge_shards(*, meter: Any, shards: list[str], out_dir: str, synthetic: Mapping[str, Any],
                 dataset: str) -> dict[str, Any]:
    """Concatenate complete shards in shard order, filter, and write the synthetic ``DatasetDict`` (``train``: the
    kept samples; ``eval``: copied from the source dataset) with ``summary.json`` and ``synthetic_info.json``."""
    import datasets

    if isinstance(shards, (str, os.PathLike)):
        shards = [str(shards)]
    if not shards:
        raise ValueError("merge_shards: no shard directories given")
    filters = normalize_filters(synthetic.get("filters"))
    loaded = [(path, *read_shard(path)) for path in shards]
    num = {info["num_shards"] for _, _, info in loaded}
    if len(num) != 1:
        raise ValueError(f"shards come from different shard layouts (num_shards {sorted(num)}): {list(shards)}")
    n = num.pop()
    by_index: dict[int, tuple[str, Any, dict]] = {}
    for path, ds, info in loaded:
        if info["shard"] in by_index:
            raise ValueError(f"shard {info['shard']} given twice: {by_index[info['shard']][0]} and {path}")
        by_index[info["shard"]] = (path, ds, info)
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise FileNotFoundError(f"synthetic shard(s) {missing} of {n} missing from the merge inputs {list(shards)}")
    ref = {k: v for k, v in by_index[0][2]["fingerprint"].items() if k not in ("shard",)}
    for i in range(n):
        fp = {k: v for k, v in by_index[i][2]["fingerprint"].items() if k not in ("shard",)}
        if fp != ref:
            diff = sorted(k for k in set(fp) | set(ref) if fp.get(k) != ref.get(k))
            raise ValueError(f"shard {by_index[i][0]} was generated with different settings ({diff}) "
                             f"than shard {by_index[0][0]}")
    ordered = [by_index[i] for i in range(n)]
    merged = datasets.concatenate_datasets([ds for _, ds, _ in ordered])
    shard_key = ref["shard_key"]
    records = merged.to_list()
    kept, counts = apply_filters(records, filters)
    source = f"synthetic:{shard_key}"
    for r in kept:
        r["source"] = source
    train = datasets.Dataset.from_list(kept, features=_features())
    eval_split = _load_source(dataset)["eval"]
    dsd = datasets.DatasetDict({"train": train, "eval": eval_split})

    totals = {key: sum(info[key] for _, _, info in ordered)
              for key in ("prompts", "prompts_dropped_too_long", "samples", "finished", "generated_tokens",
                          "input_tokens")}
    kept_tokens = {"generated_tokens": sum(r["generated_tokens"] for r in kept),
                   "prompt_tokens": sum(r["prompt_tokens"] for r in kept)}
    info = {
        "shard_key": shard_key, "source_dataset": str(dataset), "teacher": ref["teacher"],
        "decoding": ref["decoding"], "resolved_backend": ref["resolved_backend"], "seed": ref["seed"],
        "n_prompts": ref["n_prompts"], "filters": filters, "filter_counts": counts, "totals": totals,
        "kept_tokens": kept_tokens, "shards": [str(p) for p, _, _ in ordered], "num_shards": n,
    }
    summary = {"dataset": Path(out_dir).name, "source": source, "n_train": len(train), "n_eval": len(eval_split),
               "content_hash": content_hash(dsd), "synthetic": info}
    def write(tmp: Path) -> None:
        dsd.save_to_disk(str(tmp))
        atomic_write_json(tmp / SYNTHETIC_INFO, info, sort_keys=True)
        atomic_write_json(tmp / SUMMARY_FILE, summary, sort_keys=True)

    out = write_dir_atomically(Path(out_dir), write)

    meter.record("filter_counts", counts)
    meter.record("samples_input", counts["input"])
    meter.record("samples_kept", counts["kept"])
    for reason, value in counts["dropped"].items():
        meter.record(f"dropped_{reason}", value)
    meter.record("generated_tokens_total", totals["generated_tokens"])
    meter.record("input_tokens_total", totals["input_tokens"])
    meter.record("kept_generated_tokens", kept_tokens["generated_tokens"])
    meter.record("prompts_dropped_too_long", totals["prompts_dropped_too_long"])
    log.info("synthetic %s: kept %d of %d samples (%s)", out.name, counts["kept"], counts["input"],
             counts["dropped"])
    return info
