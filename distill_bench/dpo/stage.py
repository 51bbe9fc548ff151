"""DPO preference-data stages (teacher side): sample candidates, judge them into pairs; plus the optional
reference log-prob pass (student side).

Sampling. The first ``dpo.n_prompts`` train prompts are cut into fixed chunks of ``CHUNK_BATCHES`` generation
batches; each (source, chunk) is one ``generate`` call seeded with ``seed + source_index * SOURCE_SEED_STRIDE +
chunk * CHUNK_BATCHES``, so output is reproducible and never depends on how often the stage was resumed. Finished
chunks are checkpointed as JSON lines under ``<out_dir>.partial/<source>/`` (atomic, with a settings fingerprint);
a rerun after SIGTERM generates only the rest. ``out_dir`` (a ``datasets.Dataset`` plus ``candidates_info.json``,
the completion marker) appears only when complete. Token counts are exact per sample: ``generated_tokens`` (up to
and including EOS) and ``input_tokens`` (templated prompt tokens, once per sample), charged for chunks generated in
this attempt only. The loop is :mod:`distill_bench.generation.chunked`, shared with synthetic data.

Judging. See ``judges`` for the three judges and ``pairs.build_pairs`` for the pairing rule. The pairs directory is a
``DatasetDict`` (split ``train``) plus ``judge_info.json`` (judge, margin, counts per reason) and
``scored_candidates.jsonl`` (every candidate's score and, for the llm judge, the raw reply).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from distill_bench.artifacts import ChunkCheckpoint
from distill_bench.atomic import atomic_write_json, atomic_write_text, jsonl_text, short_hash, write_dir_atomically
from distill_bench.data.io import dataset_hash_or_none
from distill_bench.dpo.config import normalize_dpo, sources_for
from distill_bench.dpo.pairs import REFERENCE_INFO, encode_pairs, read_pairs, resolve_lengths
from distill_bench.dpo.train import check_reference_tokenizer, train_dpo
from distill_bench.generation.chunked import (CHUNK_BATCHES, ChunkedRun, MeteredTokens, chunk_bounds, chunk_prompts,
                                             generate_chunks)
from distill_bench.generation.hf_backend import load_model as load_inference_model
from distill_bench.train.launch import launch_train, wants_launch
from distill_bench.train.trainer import TrainSettings

log = logging.getLogger(__name__)

SOURCE_SEED_STRIDE = 1_000_003
CANDIDATES_INFO = "candidates_info.json"
JUDGE_INFO = "judge_info.json"
SCORED = "scored_candidates.jsonl"
CANDIDATE_COLUMNS = ("prompt_id", "prompt", "answer", "source", "sample_index", "response", "prompt_tokens",
                     "generated_tokens", "finished")
PAIR_COLUMNS = ("prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_source",
                "rejected_source")


# --------------------------------------------------------------------------------------------- sampling


def sample_candidates(*, meter, models: Mapping[str, str], dataset: str, out_dir: str,
                      dpo: Mapping[str, Any], seed: int, tokenizer: str | None = None) -> dict[str, Any]:
    """Sample ``dpo.samples_per_prompt`` candidates per prompt from each source model of ``dpo.sample_source``.

    ``tokenizer``: the one every source shares (the run's); None = each source model's own (teacher and student of
    different families), so each source's prompts are templated and its generated tokens counted by its tokenizer.
    """
    from distill_bench.generation import GenerationSettings, resolve_backend
    from distill_bench.generation.prompts import load_tokenizer
    from distill_bench.models.build import tokenizer_source_for_model
    from distill_bench.models.stage import load_split

    cfg = normalize_dpo(dpo)
    wanted = sources_for(cfg["sample_source"])
    if not isinstance(models, Mapping):
        raise TypeError(f"models must map a source label to a model dir, got {type(models).__name__}")
    unknown = sorted(set(models) - {"teacher", "student"})
    if unknown:
        raise ValueError(f"models: unknown source label(s) {unknown}; use 'teacher' and/or 'student'")
    missing = [s for s in wanted if not models.get(s)]
    if missing:
        raise ValueError(f"dpo.sample_source {cfg['sample_source']!r} needs model(s) {missing}; got {sorted(models)}")
    backend = resolve_backend("auto")
    try:
        base = GenerationSettings(backend=backend, batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"],
                                  temperature=float(cfg["temperature"]), top_p=float(cfg["top_p"]),
                                  num_samples=cfg["samples_per_prompt"], seed=int(seed), prompt_overflow="drop",
                                  hf_decode=cfg["hf_decode"], hf_prefill=cfg["hf_prefill"])
    except ValueError as e:
        raise ValueError(f"dpo: {e}") from None

    train = load_split(dataset, "train")
    for col in ("id", "answer"):
        if col not in train.column_names:
            raise KeyError(f"dataset {dataset!r} train split lacks column {col!r}")
    total = len(train) if cfg["n_prompts"] is None else min(cfg["n_prompts"], len(train))
    if total == 0:
        raise ValueError(f"dataset {dataset!r} has no train prompts")
    rows_src = train.select(range(total))
    prompts, ids, answers = list(rows_src["prompt"]), list(rows_src["id"]), list(rows_src["answer"])
    per_chunk = chunk_prompts(base)
    chunks = chunk_bounds(total, base)
    decoding = {k: cfg[k] for k in ("samples_per_prompt", "temperature", "top_p", "max_new_tokens", "batch_size")}

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_root = out.with_name(out.name + ".partial")
    meter.set_primary_tokens("generated_tokens")
    tokens = MeteredTokens(meter)
    run = ChunkedRun()
    resumed_chunks = 0
    all_rows: list[dict] = []
    for s_index, source in enumerate(wanted):
        tok = None
        tok_src = tokenizer if tokenizer else models[source]
        fingerprint = {"source": source, "model": str(models[source]), "tokenizer": str(tokenizer),
                       "dataset": str(dataset), "dataset_hash": dataset_hash_or_none(dataset), "decoding": decoding,
                       "backend": backend, "n_prompts": total, "seed": int(seed), "chunk_prompts": per_chunk,
                       "source_index": s_index}
        checkpoint = ChunkCheckpoint(partial_root / source, fingerprint, what="candidates")
        done = checkpoint.done
        resumed_chunks += len(done)
        todo = [c for c in range(len(chunks)) if c not in done]
        if todo:
            checkpoint.start()
            model = models[source] if backend == "vllm" else load_inference_model(models[source])
            if tok is None:
                if backend == "vllm" and not tokenizer:
                    tok = tokenizer_source_for_model(tok_src) or tok_src
                else:
                    tok = tok_src if backend == "vllm" else load_tokenizer(tok_src)

            def row_of(i: int, r, source=source) -> dict[str, Any]:
                return {"prompt_id": ids[i], "prompt": prompts[i], "answer": answers[i], "source": source,
                        "sample_index": int(r.sample_index), "response": r.text.strip(),
                        "prompt_tokens": int(r.prompt_tokens), "generated_tokens": int(r.generated_tokens),
                        "finished": bool(r.finished), "dropped": bool(r.dropped)}

            generate_chunks(model, tok, prompts, chunks=chunks, todo=todo, settings=base,
                            seed_of=lambda c, s_index=s_index: int(seed) + s_index * SOURCE_SEED_STRIDE
                            + c * CHUNK_BATCHES, row_of=row_of, checkpoint=checkpoint, meter=meter, tokens=tokens,
                            run=run)
            del model
        all_rows.extend(row for c in range(len(chunks)) for row in done[c])
    attempt = {"generated_tokens": run.generated_tokens, "input_tokens": run.input_tokens,
               "resumed_chunks": resumed_chunks}

    kept = [r for r in all_rows if not r["dropped"]]
    dropped_prompts = sorted({r["prompt_id"] for r in all_rows if r["dropped"]})
    records = [{k: r[k] for k in CANDIDATE_COLUMNS} for r in kept]
    info = {
        "complete": True, "sources": {s: str(models[s]) for s in wanted}, "tokenizer": str(tokenizer),
        "dataset": str(dataset), "n_prompts": total, "prompt_ids": ids, "decoding": decoding, "backend": backend,
        "seed": int(seed), "candidates": len(records), "prompts_dropped_too_long": len(dropped_prompts),
        "dropped_prompt_ids": dropped_prompts, "finished": sum(r["finished"] for r in records),
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        "input_tokens": sum(r["prompt_tokens"] for r in records), "attempt": attempt,
    }

    def write(tmp: Path) -> None:
        import datasets

        feats = datasets.Features({
            "prompt_id": datasets.Value("string"), "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"), "source": datasets.Value("string"),
            "sample_index": datasets.Value("int32"), "response": datasets.Value("string"),
            "prompt_tokens": datasets.Value("int32"), "generated_tokens": datasets.Value("int32"),
            "finished": datasets.Value("bool")})
        ds = datasets.Dataset.from_list(records, features=feats) if records else \
            datasets.Dataset.from_dict({k: [] for k in CANDIDATE_COLUMNS}, features=feats)
        ds.save_to_disk(str(tmp / "data"), num_shards=None if records else 1)
        atomic_write_json(tmp / CANDIDATES_INFO, info)  # completion marker, last

    write_dir_atomically(out, write)
    shutil.rmtree(partial_root, ignore_errors=True)
    for kind in ("generated_tokens", "input_tokens"):
        meter.add_tokens(kind, 0)
    for key in ("candidates", "finished", "prompts_dropped_too_long", "n_prompts"):
        meter.record(key, info[key])
    meter.record("sample_source", cfg["sample_source"])
    meter.record("samples_per_prompt", cfg["samples_per_prompt"])
    meter.record("resumed_chunks", attempt["resumed_chunks"])
    if tokens.tokens_per_s() is not None:
        meter.record("steady_state_tokens_per_s", tokens.tokens_per_s())
    meter.record("backend", backend)
    return {k: v for k, v in info.items() if k != "prompt_ids"}


def read_candidates(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """(candidate rows, candidates_info) of a finished sampling stage; an incomplete dir is an error naming it."""
    import datasets

    p = Path(path)
    marker = p / CANDIDATES_INFO
    if not marker.is_file():
        raise FileNotFoundError(f"DPO candidates {p} are missing or incomplete (no {CANDIDATES_INFO}); "
                                "rerun its sample_candidates job")
    info = json.loads(marker.read_text())
    return datasets.load_from_disk(str(p / "data")).to_list(), info


# --------------------------------------------------------------------------------------------- judging


def _judge_tokenizer(judge_model: str, fallback: str):
    """The judge's own tokenizer when its dir carries one (the judge only reads text), else the run's."""
    from distill_bench.models.build import tokenizer_source_for_model
    from distill_bench.models.tokenizer import load_tokenizer

    src = tokenizer_source_for_model(judge_model)
    return load_tokenizer(src or fallback), (src or fallback)


def judge_candidates(*, meter, candidates: str, out_dir: str, dpo: Mapping[str, Any], judge_model: str | None,
                     seed: int, tokenizer: str | None = None) -> dict[str, Any]:
    """Score every candidate with ``dpo.judge`` and write best-vs-worst pairs (``DatasetDict``, split ``train``)."""
    import datasets

    from distill_bench.dpo.judges import score_llm, score_teacher_logprob, score_verifier
    from distill_bench.dpo.pairs import build_pairs

    cfg = normalize_dpo(dpo)
    judge, margin = cfg["judge"], float(cfg["margin"])
    rows, cinfo = read_candidates(candidates)
    meter.set_primary_tokens("judged_candidates")
    raw: list[str] | None = None
    judge_tok_src = None
    if judge == "verifier":
        scores: list[float | None] = list(score_verifier(rows))
    else:
        if not judge_model:
            raise ValueError(f"dpo.judge {judge!r} needs a judge model (judge_model), got {judge_model!r}")
        jtok, judge_tok_src = _judge_tokenizer(judge_model, tokenizer)
        model = load_inference_model(judge_model)
        if judge == "teacher_logprob":
            scores, forwarded = score_teacher_logprob(model, jtok, rows, cfg["batch_size"])
            meter.add_tokens("input_tokens", int(forwarded))
        else:
            def on_batch(n: int, _s: float) -> None:
                meter.add_tokens("generated_tokens", int(n))

            scores, raw, totals = score_llm(model, jtok, rows, cfg["batch_size"], seed=int(seed), on_batch=on_batch)
            meter.add_tokens("input_tokens", int(totals["input_tokens"]))
            meter.add_tokens("generated_tokens", 0)
        del model
    meter.add_tokens("judged_candidates", len(rows))

    scored = [{**r, "score": s} for r, s in zip(rows, scores)]
    pairs, counts = build_pairs(scored, margin)
    seen = {r["prompt_id"] for r in rows}
    unsampled = [pid for pid in cinfo.get("prompt_ids", []) if pid not in seen]  # dropped at sampling (too long)
    counts["prompts_without_candidates"] += len(unsampled)
    for key, value in counts.items():
        meter.record(key, int(value))
    meter.record("judge", judge)
    meter.record("margin", margin)
    meter.record("candidates", len(rows))
    if not pairs:
        raise ValueError(f"no preference pair survived judge {judge!r} with margin {margin} "
                         f"({len(rows)} candidates; counts {counts}): lower dpo.margin, sample more "
                         "(dpo.samples_per_prompt, dpo.temperature) or pick another dpo.judge")
    valid = [s for s in scores if s is not None]
    info = {"judge": judge, "margin": margin, "judge_model": judge_model, "judge_tokenizer": judge_tok_src,
            "candidates": str(candidates), "counts": counts, "n_candidates": len(rows),
            "mean_score": (sum(valid) / len(valid)) if valid else None,
            "mean_chosen_score": sum(p["chosen_score"] for p in pairs) / len(pairs),
            "mean_rejected_score": sum(p["rejected_score"] for p in pairs) / len(pairs),
            "sources": cinfo.get("sources"), "seed": int(seed)}
    scored_out = [{"prompt_id": r["prompt_id"], "source": r["source"], "sample_index": r["sample_index"],
                   "score": s, **({"judge_output": raw[i]} if raw is not None else {})}
                  for i, (r, s) in enumerate(zip(rows, scores))]

    def write(tmp: Path) -> None:
        ds = datasets.Dataset.from_list([{k: p[k] for k in PAIR_COLUMNS} for p in pairs])
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp))
        atomic_write_text(tmp / SCORED, jsonl_text(scored_out))
        atomic_write_json(tmp / JUDGE_INFO, info)

    write_dir_atomically(Path(out_dir), write)
    meter.record("mean_chosen_score", info["mean_chosen_score"])
    meter.record("mean_rejected_score", info["mean_rejected_score"])
    log.info("judge %s (margin %s): %d pairs from %d candidates (%s)", judge, margin, len(pairs), len(rows), counts)
    return info


# --------------------------------------------------------------------------------------------- reference pass


def precompute_reference(*, meter, pairs: str, tokenizer: str, init_model: str, out_dir: str,
                         dpo: Mapping[str, Any], training: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Reference (= starting checkpoint) log-probs of every pair's chosen and rejected response, as their own metered
    stage. Writes the pairs plus ``ref_chosen_logps``/``ref_rejected_logps`` columns; ``train_dpo`` with
    ``dpo.precompute_ref_logprobs: true`` takes this directory as its ``pairs`` and then never loads a reference."""
    import contextlib

    import datasets
    import torch

    from distill_bench.dpo.judges import sequence_logprobs
    from distill_bench.models.tokenizer import load_tokenizer

    cfg = normalize_dpo(dpo)
    max_length, precision = resolve_lengths(cfg, training)
    tok = load_tokenizer(tokenizer)
    vhash = check_reference_tokenizer(init_model, tokenizer, tok)
    ds = read_pairs(pairs)
    enc, dropped = encode_pairs(tok, ds, max_length)
    if not enc:
        raise ValueError(f"no DPO pair of {pairs!r} fits max_length={max_length}")
    model = load_inference_model(init_model)
    seqs_c = [{"input_ids": e["prompt_ids"] + e["chosen_ids"],
               "completion_mask": [0] * len(e["prompt_ids"]) + [1] * len(e["chosen_ids"])} for e in enc]
    seqs_r = [{"input_ids": e["prompt_ids"] + e["rejected_ids"],
               "completion_mask": [0] * len(e["prompt_ids"]) + [1] * len(e["rejected_ids"])} for e in enc]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast("cuda", dtype=dtype) if (dtype is not None and torch.cuda.is_available()) \
        else contextlib.nullcontext()
    meter.set_primary_tokens("input_tokens")
    with ctx:
        pad = tok.pad_token_id
        lc = sequence_logprobs(model, seqs_c, cfg["batch_size"], pad)
        lr_ = sequence_logprobs(model, seqs_r, cfg["batch_size"], pad)
    forwarded = sum(len(s["input_ids"]) for s in seqs_c + seqs_r)
    meter.add_tokens("input_tokens", forwarded)
    rows = [dict(ds[e["index"]], ref_chosen_logps=c[0], ref_rejected_logps=r[0]) for e, c, r in zip(enc, lc, lr_)]
    info = {"init_model": str(init_model), "vocab_hash": vhash, "max_length": max_length, "precision": precision,
            "pairs": str(pairs), "n_pairs": len(rows), "dropped_too_long": dropped, "forwarded_tokens": forwarded,
            "pairs_hash": short_hash([[r["prompt"], r["chosen"], r["rejected"]] for r in rows])}

    def write(tmp: Path) -> None:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp))
        atomic_write_json(tmp / REFERENCE_INFO, info)

    write_dir_atomically(Path(out_dir), write)
    meter.record("pairs", len(rows))
    meter.record("dropped_too_long", dropped)
    return info


# --------------------------------------------------------------------------------------------- training


def train_preferences(*, meter, dataset: str, tokenizer: str, init_model: str, out_dir: str, dpo: Mapping[str, Any],
                      training: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """DPO's stage entry (the workflow's ``train_student`` rule for a ``dpo`` experiment): ``dataset`` is the judge's
    (or the reference pass's) pairs dir. Several GPUs or nodes go through the same torchrun launch as SFT and KD:
    this process keeps the meter, the workers train, the token counts come back once (all-reduced by rank 0)."""
    settings = TrainSettings.from_dict(training)
    if wants_launch(settings):
        return launch_train(meter=meter, settings=settings, target=f"{__name__}:train_preferences", stage_kwargs=dict(
            dataset=dataset, tokenizer=tokenizer, init_model=init_model, out_dir=out_dir, dpo=dict(dpo),
            training=dict(training), seed=seed))
    return train_dpo(meter=meter, pairs=dataset, tokenizer=tokenizer, init_model=init_model, out_dir=out_dir,
                     dpo=dict(dpo), training=training, seed=seed)
