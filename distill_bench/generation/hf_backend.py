"""HF transformers backend: static left-padded, length-sorted batches (or transformers' continuous batching).

Decode modes for static batches (``GenerationSettings.hf_decode``): ``eager`` HF ``generate`` with the dynamic cache;
``hf_static`` HF ``generate`` with a static cache + its auto-compile; ``graph`` our static-cache loop with a CUDA-graph
decode step (``static_decode``); ``auto`` picks ``graph`` on CUDA. Measured in docs/BENCHMARKS.md (generation).

Why left padding: decoder-only models append new tokens at the right; right padding puts pad tokens between the
prompt and the generation, which corrupts greedy output (the original study did that at batch 4 and also counted
the padding as generated tokens). Sorting prompts by length before chunking keeps padding per batch minimal.
"""
from __future__ import annotations

import time
from typing import Callable

from distill_bench.generation.prompts import PreparedPrompt, eos_ids, prepare
from distill_bench.generation.settings import GenerationResult, GenerationSettings
from distill_bench.models import build as model_build

OnBatch = Callable[[int, float], None]


def load_model(model_or_dir):
    """A model for inference: a model object passes through; a path is loaded (``distill_bench.models``: clear
    errors, pointer dirs) onto the GPU when there is one, in eval mode. Every generating stage loads through here,
    so none silently decodes on the CPU of a GPU machine."""
    if not isinstance(model_or_dir, (str, bytes)) and not hasattr(model_or_dir, "__fspath__"):
        return model_or_dir
    import torch

    return model_build.load_model(str(model_or_dir), device="cuda" if torch.cuda.is_available() else None).eval()


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _generation_config(settings: GenerationSettings, eos: set[int], pad_id: int, bos_id: int | None,
                       num_return_sequences: int):
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos),
              num_return_sequences=num_return_sequences, bos_token_id=bos_id)
    if settings.greedy:
        kw.update(do_sample=False)
    else:
        kw.update(do_sample=True, temperature=float(settings.temperature), top_p=float(settings.top_p), top_k=0)
    return GenerationConfig(**kw)


def count_generated(tokens: list[int], eos: set[int]) -> tuple[int, bool]:
    """Real generated tokens: up to and including the first EOS; everything after it is padding."""
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1, True
    return len(tokens), False


def _result(p: PreparedPrompt, sample: int, tokens: list[int], tokenizer, eos: set[int]) -> GenerationResult:
    n, finished = count_generated(tokens, eos)
    kept = tokens[:n - 1] if finished else tokens[:n]
    return GenerationResult(prompt_index=p.index, sample_index=sample,
                            text=tokenizer.decode(kept, skip_special_tokens=True), prompt_tokens=len(p.ids),
                            generated_tokens=n, finished=finished, truncated_tokens=p.truncated_tokens,
                            token_ids=tuple(tokens[:n]))


def _dropped(p: PreparedPrompt, settings: GenerationSettings) -> list[GenerationResult]:
    return [GenerationResult(p.index, s, "", p.original_tokens, 0, False, dropped=True)
            for s in range(settings.num_samples)]


def generate_hf(model_or_dir, tokenizer, prompts: list[str], settings: GenerationSettings,
                on_batch: OnBatch | None = None) -> list[GenerationResult]:
    model = load_model(model_or_dir)
    model.eval()
    eos = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    prepared = prepare(tokenizer, prompts, settings, context_length(model))
    live = [p for p in prepared if p.ids is not None]
    if settings.continuous_batching and settings.hf_decode not in ("eager", "auto"):
        raise ValueError(f"generation settings: continuous_batching and hf_decode={settings.hf_decode!r} exclude "
                         "each other (continuous batching has its own CUDA graphs)")
    results: dict[tuple[int, int], GenerationResult] = {}
    for p in prepared:
        if p.ids is None:
            for r in _dropped(p, settings):
                results[(r.prompt_index, r.sample_index)] = r
    if settings.continuous_batching and live:
        _continuous(model, tokenizer, live, settings, eos, pad_id, results, on_batch)
    else:
        def per_batch(rows: list[int], new_tokens: list[list[list[int]]], elapsed: float) -> None:
            n_batch = 0
            for k, samples in zip(rows, new_tokens):
                p = live[k]
                for s, tokens in enumerate(samples):
                    r = _result(p, s, tokens, tokenizer, eos)
                    results[(p.index, s)] = r
                    n_batch += r.generated_tokens
            if on_batch is not None:
                on_batch(n_batch, elapsed)

        generate_ids(model, [p.ids for p in live], settings, eos, pad_id, per_batch, bos_id=tokenizer.bos_token_id)
    return [results[(p.index, s)] for p in prepared for s in range(settings.num_samples)]


def resolve_decode(settings: GenerationSettings, device) -> str:
    """``auto`` -> ``graph`` on CUDA, ``eager`` elsewhere."""
    if settings.hf_decode != "auto":
        return settings.hf_decode
    return "graph" if getattr(device, "type", "cpu") == "cuda" else "eager"


def resolve_prefill(settings: GenerationSettings, model, device) -> str:
    """``auto`` -> ``packed`` for plain causal models in bf16/fp16 where the varlen kernel runs (CUDA), ``eager``
    elsewhere (the flash kernel takes 16-bit inputs: an fp32 model would attend in lower precision)."""
    if settings.hf_prefill != "auto":
        return settings.hf_prefill
    import torch

    from distill_bench.train import varlen

    config = getattr(model, "config", None)
    on_cuda = getattr(device, "type", "cpu") == "cuda"
    half = getattr(model, "dtype", None) in (torch.bfloat16, torch.float16)
    return "packed" if config is not None and on_cuda and half and varlen.auto_applies(config) else "eager"


def generate_ids(model, prompt_ids: list[list[int]], settings: GenerationSettings, eos: set[int], pad_id: int,
                 on_batch: Callable[[list[int], list[list[list[int]]], float], None], *,
                 bos_id: int | None = None, stats: dict | None = None, decode_attention: str = "grouped",
                 prefill: str | None = None) -> None:
    """Static-batch decoding of token-id prompts: longest first, ``batch_size // num_samples`` prompts per batch,
    left padded. ``on_batch(prompt_positions, new_tokens_per_prompt_per_sample, elapsed_s)`` per batch; new tokens
    are what ``generate`` returns after the prompt (pad after EOS included; callers count with
    ``count_generated``). ``stats`` (optional dict) receives the resolved mode, row count, cache length and, for
    ``graph``, per-batch prefill/decode times. ``decode_attention`` (``graph`` only): ``grouped`` (default),
    ``grouped_bmm`` or ``model`` (``static_decode.DECODE_ATTENTION``; for the benchmark's comparisons); ``prefill``
    (``graph`` only): one of ``static_decode.PREFILL``, overriding ``settings.hf_prefill`` (None: the setting,
    resolved by ``resolve_prefill``). Shared by
    ``generate_hf`` and benchmarks/gpu_generation.py."""
    import torch

    from distill_bench.generation.static_decode import left_padded

    if not prompt_ids:
        return
    device = getattr(model, "device", torch.device("cpu"))
    mode = resolve_decode(settings, device)
    # longest first: a batch that does not fit in memory fails at once, not at the end
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    per_batch = max(1, settings.batch_size // settings.num_samples)
    fixed_rows = mode != "eager"  # compiled paths: every batch has the same row count (no recompile)
    if fixed_rows:
        per_batch = min(per_batch, len(order))
    longest = len(prompt_ids[order[0]])
    gen_config = _generation_config(settings, eos, pad_id, bos_id, settings.num_samples)
    decoder = None
    if mode == "hf_static":
        from transformers import CompileConfig

        from distill_bench.generation.static_decode import cache_length

        gen_config.cache_implementation = "static"
        gen_config.max_cache_len = cache_length(longest, settings.max_new_tokens)
        gen_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead", dynamic=False)
    elif mode == "graph":
        from distill_bench.generation.static_decode import StaticDecoder, cache_length

        decoder = StaticDecoder(model, per_batch * settings.num_samples,
                                cache_length(longest, settings.max_new_tokens), compile=device.type == "cuda",
                                attention=decode_attention,
                                prefill=prefill or resolve_prefill(settings, model, device))
    if stats is not None:
        stats.update(mode=mode, rows_per_batch=per_batch * settings.num_samples,
                     prefill=decoder.prefill if decoder is not None else None,
                     cache_len=decoder.max_cache_len if decoder is not None else gen_config.max_cache_len,
                     batches=decoder.timings if decoder is not None else [])
    for b, start in enumerate(range(0, len(order), per_batch)):
        rows = order[start:start + per_batch]
        real = len(rows)
        if fixed_rows and real < per_batch:  # filler rows (copies of the first) keep the compiled shape
            rows = rows + [rows[0]] * (per_batch - real)
        ids, mask = left_padded([prompt_ids[k] for k in rows], pad_id)
        width = ids.shape[1]
        if not settings.greedy:
            # seeded per batch: sampled output is reproducible for a given batch_size and prompt order
            torch.manual_seed(settings.seed + b)
        t0 = time.perf_counter()
        with torch.no_grad():
            if decoder is not None:
                reps = settings.num_samples
                new = decoder.generate(ids.repeat_interleave(reps, 0).to(device),
                                       mask.repeat_interleave(reps, 0).to(device),
                                       max_new_tokens=settings.max_new_tokens, eos=eos, pad_id=pad_id,
                                       greedy=settings.greedy, temperature=settings.temperature,
                                       top_p=settings.top_p)
            else:
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_config)
                new = out[:, width:]
            new = new.tolist()
        elapsed = time.perf_counter() - t0
        k = settings.num_samples
        on_batch(rows[:real], [new[r * k:(r + 1) * k] for r in range(real)], elapsed)


def _continuous(model, tokenizer, live, settings, eos, pad_id, results, on_batch) -> None:
    """transformers' paged continuous batching (``generate_batch``): requests join/leave the running batch as they
    finish, no padding at all. Measured on this 2-core CPU (torch 2.13, transformers 5.24, tiny Llama): it runs
    and its greedy output equals the static path's token for token, but the manager's thread start/stop and
    ``gc.collect`` cost ~6 s per call (vs 0.07 s for 5 prompts with static batches), hence off by default; it is
    meant for GPUs, where it avoids padding entirely."""
    if not hasattr(model, "generate_batch"):
        raise RuntimeError("continuous_batching: this transformers version has no model.generate_batch")
    if not settings.greedy:
        import torch

        torch.manual_seed(settings.seed)
    gen_config = _generation_config(settings, eos, pad_id, tokenizer.bos_token_id, settings.num_samples)
    t0 = time.perf_counter()
    # warm-up pre-captures CUDA graphs; on CPU it only costs time (~13 s here)
    warmup = getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    outputs = model.generate_batch(inputs=[p.ids for p in live], generation_config=gen_config,
                                   progress_bar=False, warmup=warmup)
    elapsed = time.perf_counter() - t0
    ordered = list(outputs.values())  # generate_batch returns input order, forked samples right after parent
    if len(ordered) != len(live) * settings.num_samples:
        raise RuntimeError(f"continuous batching returned {len(ordered)} results for "
                           f"{len(live) * settings.num_samples} requests")
    n_total = 0
    for k, out in enumerate(ordered):
        if out.error is not None:
            raise RuntimeError(f"continuous batching request {out.request_id} failed: {out.error}")
        p = live[k // settings.num_samples]
        r = _result(p, k % settings.num_samples, list(out.generated_tokens), tokenizer, eos)
        results[(p.index, r.sample_index)] = r
        n_total += r.generated_tokens
    if on_batch is not None:
        on_batch(n_total, elapsed)
