"""Teacher generation on GPU (issue 10): hf backend decode modes vs the decode roofline, one table, one JSON.

    python benchmarks/gpu_generation.py --out DIR            # OLMo-2-0425-1B shape, bf16, needs a CUDA GPU
    python benchmarks/gpu_generation.py --out DIR --shapes llama3.2-1b,llama3.1-8b --variants graph_b64,graph_b64_n512
    python benchmarks/gpu_generation.py --out DIR --quick    # tiny shapes on CPU (checks the code paths only)

Random-initialised weights (no downloads); prompts of random ids, 128-512 tokens; greedy; 128 new tokens. Each
variant goes through ``distill_bench.generation.hf_backend.generate_ids`` (the backend's own batching), is warmed up
on its first batch (compile + CUDA-graph capture time reported separately), then timed with CUDA events over all
prompts inside ``StageMeter`` (codecarbon off). Generated tokens are counted exactly (up to and including EOS).
Roofline = rows x HBM bandwidth / bytes of weights read per step (all parameters but the input embedding; a tied
LM head counted); ``kv_roofline`` also counts the K/V bytes a step must read (the issue's target uses the
weight-only one); ``decode % roofline`` is the decode phase alone (prefill excluded); ``% prefill+decode roofline``
compares the whole run with its ideal time: prefill FLOPs of the real prompt tokens at the measured bf16 matmul
peak plus the generated tokens at the weight roofline.
HBM bandwidth: a 4 GiB device copy in the same call (bytes read + written); matmul peak: bf16 8192^3.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_suite import TINY, Metered, Timer, dev, hbm_copy_tb_s, make_model, matmul_peak_tflops, sync  # noqa: E402

T0 = time.monotonic()


def dynamo_counts() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {"frames_ok": int(counters["frames"]["ok"]), "unique_graphs": int(counters["stats"]["unique_graphs"])}
    except Exception:  # noqa: BLE001 - counters are informative only
        return {}


def run_variant(model, name, prompts, settings, *, eos, tmp, warm: bool = True,
                decode_attention: str = "grouped", prefill: str = "eager") -> dict:
    from distill_bench.generation.hf_backend import count_generated, generate_ids

    per = max(1, settings.batch_size)
    first = sorted(prompts, key=len, reverse=True)[:per]
    res = {"variant": name, "mode": settings.hf_decode, "batch": settings.batch_size, "prompts": len(prompts),
           "prompt_tokens": sum(map(len, prompts)), "max_new_tokens": settings.max_new_tokens}
    if warm:
        tc = time.perf_counter()
        generate_ids(model, first, settings, eos, 0, lambda *a: None, decode_attention=decode_attention,
                     prefill=prefill)
        sync()
        res["warmup_first_batch_s"] = time.perf_counter() - tc
    before = dynamo_counts()
    stats: dict = {}
    gen = {}

    def on_batch(rows, new, elapsed):
        for k, samples in zip(rows, new):
            gen[k] = samples[0]

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with Metered(tmp, name, role="teacher") as m, Timer() as t:
        generate_ids(model, prompts, settings, eos, 0, on_batch, stats=stats, decode_attention=decode_attention,
                     prefill=prefill)
    n_tok = sum(count_generated(gen[k], eos)[0] for k in range(len(prompts)))
    after = dynamo_counts()
    res.update(time_s=t.s, generated_tokens=n_tok, tokens_per_s=n_tok / t.s, gpu_j=m.gpu_j,
               j_per_token=m.gpu_j / n_tok if m.gpu_j else None, gpu_avg_w=m.avg_w,
               recompiles_in_timed_run={k: after.get(k, 0) - before.get(k, 0) for k in after},
               cache_len=stats.get("cache_len"), rows_per_batch=stats.get("rows_per_batch"),
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    b = stats.get("batches", [])  # the timed call builds its own decoder: these are its batches only
    if b:
        steps = sum(x["decode_steps"] for x in b)
        res["prefill_s"] = sum(x["prefill_s"] for x in b)
        res["decode_s"] = sum(x["decode_s"] for x in b)
        res["decode_ms_per_step"] = 1e3 * res["decode_s"] / max(1, steps)
    res["_tokens"] = gen
    return res


def continuous(model, name, prompts, new, eos, tmp) -> dict:
    from transformers import GenerationConfig

    from distill_bench.generation.hf_backend import count_generated

    gc = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=sorted(eos))
    tc = time.perf_counter()
    model.generate_batch(inputs=prompts[:8], generation_config=gc, progress_bar=False, warmup=True)
    warm = time.perf_counter() - tc
    with Metered(tmp, name, role="teacher") as m, Timer() as t:
        outs = model.generate_batch(inputs=prompts, generation_config=gc, progress_bar=False, warmup=True)
    toks = [list(o.generated_tokens) for o in outs.values()]
    n_tok = sum(count_generated(x, eos)[0] for x in toks)
    return {"variant": name, "mode": "continuous_batching", "batch": "auto", "prompts": len(prompts),
            "max_new_tokens": new, "warmup_s": warm, "time_s_incl_manager_warmup": t.s, "generated_tokens": n_tok,
            "tokens_per_s": n_tok / t.s, "gpu_j": m.gpu_j, "j_per_token": m.gpu_j / n_tok if m.gpu_j else None,
            "gpu_avg_w": m.avg_w, "_tokens": dict(enumerate(toks))}


def decode_compile_mode(name: str) -> str:
    """``..._mat``: the decode step compiled with ``max-autotune`` (Triton GEMM templates timed against cuBLAS, CUDA
    graphs kept); else the package's default."""
    from distill_bench.generation import static_decode

    return "max-autotune" if name.endswith("_mat") else static_decode.DECODE_COMPILE_MODE


def decode_compiled(mode: str):
    """The decode step compiled in ``mode`` for the block only."""
    from distill_bench.generation import static_decode

    return mock.patch.object(static_decode, "DECODE_COMPILE_MODE", mode)


def parse_variant(name: str) -> tuple[str, int, int | None, str, str]:
    """``<mode>_b<rows>[_n<new tokens>][_pp|_pc][_bmm|_sdpa|_gqa][_mat]`` -> (hf_decode mode, rows, new tokens or None,
    decode attention, prefill).

    Prefill of ``graph`` variants (``static_decode.PREFILL``): ``_pp`` packed (padding-free), ``_ppu`` packed with
    its norms, rotary embedding and SwiGLU product left unfused (``packed_unfused``, this benchmark's A/B only), ``_pc`` the padded
    prefill compiled with dynamic shapes, else eager over the left-padded batch.

    Decode attention of ``graph`` variants: ``grouped`` (default, distill_bench.generation.decode_attention: SDPA
    with ``enable_gqa`` on the grouped K/V of the one decode token); ``_bmm`` = its two-bmm kernel; ``_sdpa`` = the
    model's own SDPA path (transformers repeats K/V to every query head under a mask); ``_gqa`` = that path with
    TRANSFORMERS_SDPA_FORCE_GQA=1 (grouped K/V with ``enable_gqa`` in prefill too). A trailing ``_mat`` (the decode
    step's compile mode, ``decode_compile_mode``) is not part of the tuple.
    """
    parts = name.removesuffix("_mat").split("_")
    attention = {"sdpa": "sdpa", "gqa": "sdpa_gqa", "bmm": "grouped_bmm"}.get(parts[-1], "grouped")
    if attention != "grouped":
        parts.pop()
    prefill = {"pc": "compiled", "pp": "packed", "ppu": "packed_unfused"}.get(parts[-1], "eager")
    if prefill != "eager":
        parts.pop()
    new = int(parts.pop()[1:]) if parts[-1].startswith("n") and parts[-1][1:].isdigit() else None
    rows = int(parts.pop()[1:])
    return "_".join(parts), rows, new, attention, prefill


def eager_twin(name: str) -> str | None:
    """The eager variant that decodes the same prompts with the same rows and new tokens (its greedy tokens are the
    reference; bf16 may differ); None for continuous-batching variants, which have none."""
    if name.startswith("cb_"):
        return None
    _, rows, new, _, _ = parse_variant(name)
    return f"eager_b{rows}" + (f"_n{new}" if new is not None else "")


def padded_twin(name: str) -> str | None:
    """The same variant with the eager prefill over the left-padded batch (None when ``name`` is that one)."""
    if name.startswith("cb_") or parse_variant(name)[4] == "eager":
        return None
    return "_".join(part for part in name.split("_") if part not in ("pp", "ppu", "pc"))


def decode_twin(name: str) -> str | None:
    """The same variant with the default decode attention and compile mode (None when ``name`` is that one)."""
    if name.startswith("cb_"):
        return None
    twin = "_".join(part for part in name.split("_") if part not in ("bmm", "mat"))
    return None if twin == name else twin


def prefill_flops(model, prompts: list[list[int]]) -> float:
    """Matmul FLOPs of prefilling ``prompts`` (real tokens only): 2 x body weights per token, the LM head once per
    prompt (only the last position's logits are needed), causal attention 2 x layers x (heads x head_dim) x len^2."""
    from gpu_suite import matmul_params

    c = model.config
    head = model.get_output_embeddings().weight.numel()
    body = matmul_params(model) - head
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn_width = c.num_attention_heads * head_dim
    return sum(2 * body * len(p) + 2 * head + 2 * c.num_hidden_layers * attn_width * len(p) ** 2 for p in prompts)


def prefill_agreement(model, prompts: list[list[int]], rows: int) -> dict:
    """The longest ``rows`` prompts as one left-padded batch, prefilled padded (the eager path) and packed: how far
    apart their last-position logits and K/V caches are, and whether every greedy token that differs is a near-tie
    the difference can flip (top-1 minus top-2 margin below twice the row's largest logit difference): bf16
    rounding of two different kernels, not a wrong mask, position or cache slot. Control: the same padded prefill
    of the batch's first half alone (other matmul shapes, same math), against the full batch's first half; and the
    padded prefill with transformers' eager attention instead of SDPA (another correct kernel)."""
    from transformers import StaticCache

    from distill_bench.generation.packed_prefill import packed_prefill
    from distill_bench.generation.static_decode import left_padded, position_ids

    batch = sorted(prompts, key=len, reverse=True)[:rows]
    ids, mask = (t.to(dev()) for t in left_padded(batch, 0))
    width = ids.shape[1]
    pos = position_ids(mask)
    padded_cache, packed_cache = (StaticCache(config=model.config, max_cache_len=width) for _ in range(2))

    def padded_logits(n: int, cache) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids[:n], position_ids=pos[:n], attention_mask=mask[:n], cache=cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1].float()

    padded = padded_logits(len(batch), padded_cache)
    half = padded_logits(len(batch) // 2, StaticCache(config=model.config, max_cache_len=width))
    own = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager_attention = padded_logits(len(batch), StaticCache(config=model.config, max_cache_len=width))
    finally:
        model.set_attn_implementation(own)
    packed = packed_prefill(model, ids, mask, pos, packed_cache)
    diff = (padded - packed).abs()
    row_max = diff.max(-1).values
    top2 = padded.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    differ = padded.argmax(-1) != packed.argmax(-1)
    keep = mask.bool()

    def at_prompts(cache_tensor: torch.Tensor) -> torch.Tensor:   # [rows, Hkv, L, D] -> [prompt tokens, Hkv, D]
        return cache_tensor.transpose(1, 2)[:, :width][keep].float()

    kv = max(float((at_prompts(a) - at_prompts(b)).abs().max() / at_prompts(a).abs().max())
             for la, lb in zip(padded_cache.layers, packed_cache.layers)
             for a, b in ((la.keys, lb.keys), (la.values, lb.values)))
    return {"rows": len(batch), "width": width, "logit_std": float(padded.std()),
            "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "argmax_identical": float((~differ).float().mean()),
            "differing_rows_max_margin": float(margin[differ].max()) if differ.any() else None,
            "differing_rows_are_near_ties": bool((margin[differ] <= 2 * row_max[differ]).all()),
            "median_margin": float(margin.median()),
            "kv_max_rel_diff": kv,
            "control_half_batch": {"max_abs_logit_diff": float((padded[:len(half)] - half).abs().max()),
                                   "mean_abs_logit_diff": float((padded[:len(half)] - half).abs().mean()),
                                   "argmax_identical": float((padded[:len(half)].argmax(-1) == half.argmax(-1))
                                                             .float().mean())},
            "control_eager_attention": {"max_abs_logit_diff": float((padded - eager_attention).abs().max()),
                                        "mean_abs_logit_diff": float((padded - eager_attention).abs().mean()),
                                        "argmax_identical": float((padded.argmax(-1) == eager_attention.argmax(-1))
                                                                  .float().mean())}}


def profile_prefill(model, prompts: list[list[int]], rows: int, peak_tflops: float, out: Path, shape: str) -> dict:
    """``profile_packed_prefill`` with the norms, rotary embedding and SwiGLU product fused (the default) and
    unfused."""
    res = {}
    for fused in (True, False):
        with fusing(fused):
            res["fused" if fused else "unfused"] = profile_packed_prefill(
                model, prompts, rows, peak_tflops, out, f"{shape}_packed_prefill{'' if fused else '_unfused'}")
    return res


def fusing(on: bool):
    """The packed prefill with its elementwise work fused (the default) or not, for the block only."""
    from distill_bench.generation import packed_prefill

    return mock.patch.object(packed_prefill, "FUSE_ELEMENTWISE", on)


def profile_packed_prefill(model, prompts: list[list[int]], rows: int, peak_tflops: float, out: Path,
                           name: str) -> dict:
    """torch.profiler over the packed prefill of ``prompts`` in the backend's batches (longest first, ``rows`` per
    batch; a static cache per batch as the decoder allocates it): kernel time by kind, the GPU's idle gaps with what
    the host ran meanwhile, and the prefill against its matmul ideal. Two untimed passes first (allocator, compiles,
    kernels' first-call setup)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    from distill_bench.generation.packed_prefill import packed_prefill
    from distill_bench.generation.static_decode import left_padded, position_ids
    from gpu_trainer import summarise_profile

    ordered = sorted(prompts, key=len, reverse=True)
    batches = []
    for i in range(0, len(ordered), rows):
        ids, mask = (t.to(dev()) for t in left_padded(ordered[i:i + rows], 0))
        batches.append((ids, mask, position_ids(mask), StaticCache(config=model.config, max_cache_len=ids.shape[1])))

    def once() -> None:
        for ids, mask, pos, cache in batches:
            packed_prefill(model, ids, mask, pos, cache)

    for _ in range(2):
        once()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        once()
        sync()
        wall = time.perf_counter() - t
    res = summarise_profile(prof, wall, len(batches), out / "profiles", f"{name}_b{rows}")
    trace = out / "profiles" / f"{name}_b{rows}_trace.json"
    prof.export_chrome_trace(str(trace))   # every kernel and host op on one timeline (chrome://tracing, Perfetto)
    with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    ideal_s = prefill_flops(model, ordered) / (peak_tflops * 1e12)
    gemm_s = res["kernel_s_by_kind"].get("gemm")
    res.update(prompt_tokens=sum(map(len, ordered)), batches=len(batches), prefill_ideal_s=ideal_s,
               fraction_of_ideal=ideal_s / wall, gemm_kernels_fraction_of_ideal=ideal_s / gemm_s if gemm_s else None)
    print(f"[{time.monotonic() - T0:6.1f}s] {name} profile: {wall:.3f}s for {len(batches)} batches, "
          f"{100 * res['fraction_of_ideal']:.1f}% of the matmul ideal"
          + (f"; its GEMM kernels alone at {100 * ideal_s / gemm_s:.1f}% of it" if gemm_s else ""), flush=True)
    return res


def profile_decode(model, prompts: list[list[int]], rows: int, bw_tb_s: float, out: Path, shape: str, *,
                   weight_bytes: int, kv_bytes_per_pos: int, attention: str, eos: set[int],
                   new_tokens: int = 128) -> dict:
    """torch.profiler over the CUDA-graph decode steps of the longest ``rows`` prompts (packed prefill, ``attention``
    as the decode attention): kernel time per decode step by kind and by kernel, set against the bytes a step must
    read. A ``new_tokens`` run minus a 2-token run of the same batch and decoder, so the prefill and the per-call
    work cancel and what is left is ``new_tokens - 2`` decode steps. Two untimed runs first (compile, capture)."""
    from torch.profiler import ProfilerActivity, profile

    from distill_bench.generation import static_decode
    from distill_bench.generation.static_decode import StaticDecoder, cache_length, left_padded
    from gpu_trainer import device_kernels, kernel_kind, summarise_profile

    batch = sorted(prompts, key=len, reverse=True)[:rows]
    ids, mask = (t.to(dev()) for t in left_padded(batch, 0))
    cache_len = cache_length(ids.shape[1], new_tokens)
    decoder = StaticDecoder(model, rows, cache_len, compile=dev().type == "cuda", attention=attention,
                            prefill="packed")
    tc = time.perf_counter()
    for _ in range(2):
        decoder.generate(ids, mask, max_new_tokens=new_tokens, eos=eos, pad_id=0, greedy=True)
    sync()
    warm_s = time.perf_counter() - tc
    mode = static_decode.DECODE_COMPILE_MODE
    name = f"{shape}_decode_{attention}{'' if mode == 'reduce-overhead' else '_' + mode}_b{rows}"
    by_run = {}
    for n in (2, new_tokens):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            decoder.generate(ids, mask, max_new_tokens=n, eos=eos, pad_id=0, greedy=True)
            sync()
            wall = time.perf_counter() - t
        steps = decoder.timings[-1]["decode_steps"]
        kernels: dict[str, float] = {}
        for key, _, us in device_kernels(prof):
            kernels[key] = kernels.get(key, 0.0) + us
        summarise_profile(prof, wall, 1, out / "profiles", f"{name}_n{n}")   # each run's tables, for reading
        by_run[n] = {"wall_s": wall, "decode_steps": steps, "kernels_us": kernels}
    short, long = by_run[2], by_run[new_tokens]
    steps = long["decode_steps"] - short["decode_steps"]
    per_kernel = {k: (long["kernels_us"].get(k, 0.0) - short["kernels_us"].get(k, 0.0)) / steps
                  for k in set(long["kernels_us"]) | set(short["kernels_us"])}
    per_kind: dict[str, float] = {}
    for k, us in per_kernel.items():
        per_kind[kernel_kind(k)] = per_kind.get(kernel_kind(k), 0.0) + us
    step_us = 1e6 * (long["wall_s"] - short["wall_s"]) / steps
    kv_bytes = rows * cache_len * kv_bytes_per_pos
    ideal_us = {"weights": 1e6 * weight_bytes / (bw_tb_s * 1e12), "kv_cache": 1e6 * kv_bytes / (bw_tb_s * 1e12)}
    res = {"attention": attention, "compile_mode": mode, "rows": rows, "width": ids.shape[1], "cache_len": cache_len,
           "decode_steps": steps, "warmup_s": warm_s, "step_us_wall": step_us,
           "kernel_us_per_step": sum(per_kernel.values()), "us_per_step_by_kind": dict(sorted(
               per_kind.items(), key=lambda x: -x[1])),
           "top_kernels_us_per_step": [{"us": us, "name": k[:140]} for k, us in
                                       sorted(per_kernel.items(), key=lambda x: -x[1])[:25]],
           "weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "ideal_us_at_copy_rate": ideal_us,
           "weights_over_gemm_kernels": ideal_us["weights"] / per_kind["gemm"] if per_kind.get("gemm") else None,
           "kv_cache_over_attention_kernels": (ideal_us["kv_cache"] / per_kind["attention"]
                                               if per_kind.get("attention") else None),
           "weight_roofline_over_step": ideal_us["weights"] / step_us if step_us > 0 else None}
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    (out / "profiles" / f"{name}.json").write_text(json.dumps(res, indent=2))
    print(f"[{time.monotonic() - T0:6.1f}s] {name}: {step_us:.0f} us/step wall, kernels "
          + ", ".join(f"{k} {v:.0f}" for k, v in res["us_per_step_by_kind"].items())
          + f" us; weights at the copy rate {ideal_us['weights']:.0f} us, K/V {ideal_us['kv_cache']:.0f} us",
          flush=True)
    del decoder
    return res


def run_shape(shape: str, variants: list[str], a, bw: float, peak_tflops: float, tmp: Path,
              on_variant=lambda payload: None) -> dict:
    """Every variant of one shape; ``on_variant(payload)`` after each (the caller writes the JSON: a later variant
    stopped by a time limit keeps the earlier ones)."""
    from distill_bench.generation import GenerationSettings
    from gpu_suite import SHAPES, decode_weight_bytes

    quick = a.quick
    cfg = dict(TINY, arch=SHAPES[shape].get("arch", "olmo2")) if quick else SHAPES[shape]
    model = make_model(cfg, torch.bfloat16 if dev().type == "cuda" else torch.float32).eval()
    weight_bytes = decode_weight_bytes(model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes_per_pos = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim \
        * next(model.parameters()).element_size()   # K and V, every layer, in the cache's (the model's) dtype
    lo, hi = (8, 40) if quick else (128, 512)
    g = torch.Generator().manual_seed(0)
    vocab = cfg["vocab_size"]
    eos = {vocab - 1}

    def prompts(n):
        lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        return [torch.randint(1, vocab - 1, (L,), generator=g).tolist() for L in lens]

    scale = 8 if quick else 1  # quick: batch 64 -> 8 etc.
    sets: dict[int, list] = {}
    runs = []
    tokens = {}
    payload: dict = {}
    check = None
    if a.prefill_check:
        check = prefill_agreement(model, sets.setdefault(64, prompts(128 // scale)), 64 // scale)
        print(f"[{time.monotonic() - T0:6.1f}s] {shape} prefill check: {json.dumps(check)}", flush=True)
        payload = {"shape": shape, "runs": runs, "prefill_check": check}
        on_variant(payload)
    if a.profile_prefill:
        profile = profile_prefill(model, sets.setdefault(64, prompts(128 // scale)), 64 // scale, peak_tflops,
                                  Path(a.out), shape)
        payload = {"shape": shape, "runs": runs, "prefill_check": check, "prefill_profile": profile}
        on_variant(payload)
    if a.profile_decode:
        decode = {}
        for spec in a.profile_decode.split(","):
            attention, _, mode = spec.partition(":")
            try:
                with decode_compiled(mode) if mode else contextlib.nullcontext():
                    decode[spec] = profile_decode(model, sets.setdefault(64, prompts(128 // scale)), 64 // scale,
                                                  bw, Path(a.out), shape, weight_bytes=weight_bytes,
                                                  kv_bytes_per_pos=kv_bytes_per_pos, attention=attention, eos=eos,
                                                  new_tokens=16 if quick else 128)
            except Exception as e:  # noqa: BLE001 - one failing kernel must not lose the other profiles and variants
                import traceback

                traceback.print_exc()
                decode[spec] = {"attention": attention, "error": repr(e)[-2000:]}
            payload = dict(payload or {"shape": shape, "runs": runs, "prefill_check": check}, decode_profile=decode)
            on_variant(payload)
    for name in variants:
        left = a.budget_s - (time.monotonic() - T0)
        if left < (40 if name.startswith("eager") else 90):
            print(f"skip {shape} {name}: {left:.0f}s of budget left", flush=True)
            runs.append({"variant": name, "skipped": f"budget ({left:.0f}s left)"})
            continue
        try:
            if name.startswith("cb_"):
                n = int(name.split("_")[1])
                r = continuous(model, name, sets.setdefault(n, prompts(max(n, 128) // scale)), 16 if quick else 128,
                               eos, tmp)
                r["roofline_rows"] = n // scale
            else:
                mode, batch, new, attention, prefill = parse_variant(name)
                new = new or (16 if quick else 128)
                if quick:
                    new = min(new, 24)
                ps = sets.setdefault(batch, prompts(max(2 * batch, 128) // scale))
                st = GenerationSettings(batch_size=max(1, batch // scale), max_new_tokens=new, hf_decode=mode)
                # read when the step is traced
                os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1" if attention == "sdpa_gqa" else "0"
                try:
                    with fusing(prefill != "packed_unfused"), decode_compiled(decode_compile_mode(name)):
                        r = run_variant(model, name, ps, st, eos=eos, tmp=tmp,
                                        decode_attention=attention if attention.startswith("grouped") else "model",
                                        prefill="packed" if prefill == "packed_unfused" else prefill)
                finally:
                    os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
                r["decode_attention"] = attention
                r["decode_compile_mode"] = decode_compile_mode(name)
                r["prefill"] = prefill
                r["roofline_rows"] = batch // scale
                r["prompt_set"] = batch
                r["prefill_flops"] = prefill_flops(model, ps)
        except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
            import traceback

            traceback.print_exc()
            r = {"variant": name, "error": repr(e)[:400]}
        if "tokens_per_s" in r:
            rows = r["roofline_rows"]
            r["roofline_tokens_per_s"] = rows * bw * 1e12 / weight_bytes
            r["fraction_of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
            if r.get("prefill_flops"):
                # end to end against its own ideal: prefill at the measured matmul peak + decode at the weight
                # roofline (the roofline is the decode part alone)
                ideal_s = (r["prefill_flops"] / (peak_tflops * 1e12)
                           + r["generated_tokens"] / r["roofline_tokens_per_s"])
                r["prefill_plus_decode_roofline_s"] = ideal_s
                r["fraction_of_prefill_plus_decode_roofline"] = ideal_s / r["time_s"]
            if r.get("cache_len"):
                step_bytes = weight_bytes + rows * r["cache_len"] * kv_bytes_per_pos
                r["kv_roofline_tokens_per_s"] = rows * bw * 1e12 / step_bytes
                if r.get("decode_ms_per_step"):
                    # decode phase alone (prefill excluded): weight-roofline step time / measured step time
                    r["decode_fraction_of_roofline"] = weight_bytes / (bw * 1e12) / (r["decode_ms_per_step"] / 1e3)
                    r["decode_step_bytes"] = step_bytes
                    r["decode_achieved_tb_s"] = step_bytes / (r["decode_ms_per_step"] / 1e3) / 1e12
                    r["prefill_share"] = r["prefill_s"] / (r["prefill_s"] + r["decode_s"])
            tokens[name] = r.pop("_tokens")
            base = eager_twin(name)
            if base not in (None, name) and base in tokens:  # greedy agreement with eager on the same prompts
                ref, got = tokens[base], tokens[name]
                r["rows_identical_to_eager"] = sum(ref[k] == got[k] for k in ref) / len(ref)
                r["first_token_identical"] = sum(ref[k][:1] == got[k][:1] for k in ref) / len(ref)
            twin = decode_twin(name)
            if twin in tokens:   # the same prefill, another decode kernel (bf16 near-ties may flip)
                ref, got = tokens[twin], tokens[name]
                r["rows_identical_to_default_decode"] = sum(ref[k] == got[k] for k in ref) / len(ref)
                r["tokens_identical_to_default_decode"] = (sum(sum(a == b for a, b in zip(ref[k], got[k]))
                                                               for k in ref) / sum(len(ref[k]) for k in ref))
            padded = padded_twin(name)
            if padded in tokens:   # the same decode after the padded prefill (bf16 may differ)
                ref, got = tokens[padded], tokens[name]
                r["rows_identical_to_padded_prefill"] = sum(ref[k] == got[k] for k in ref) / len(ref)
                r["first_token_identical_to_padded_prefill"] = sum(ref[k][:1] == got[k][:1] for k in ref) / len(ref)
        r["shape"] = shape
        runs.append(r)
        print(f"[{time.monotonic() - T0:6.1f}s] {json.dumps(r, default=str)}", flush=True)
        payload = {"shape": shape, "model_config": {k: v for k, v in cfg.items()}, "weight_bytes": weight_bytes,
                   "kv_bytes_per_position": kv_bytes_per_pos, "runs": runs, "prefill_check": check,
                   "prefill_profile": payload.get("prefill_profile"), "decode_profile": payload.get("decode_profile")}
        on_variant(payload)
    del model
    if torch.cuda.is_available():
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return payload


def main() -> None:
    from gpu_suite import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip later variants past this wall time")
    ap.add_argument("--shapes", default="olmo2-1b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--variants", default="eager_b64,graph_b64,eager_b256,graph_b256,cb_256,hf_static_b64,"
                                          "graph_b512",
                    help="comma list of <eager|graph|hf_static>_b<rows>[_n<new tokens>][_pp|_ppu|_pc]"
                         "[_bmm|_sdpa|_gqa][_mat] or "
                         "cb_<rows>; "
                         "shape:variant limits one to that shape")
    ap.add_argument("--prefill-check", action="store_true",
                    help="first compare the padded and packed prefill of one batch (logits, K/V, near-ties)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="first profile the packed prefill of the batch-64 prompt set (kernels by kind, idle gaps)")
    ap.add_argument("--profile-decode", default="",
                    help="then profile the CUDA-graph decode steps of the batch-64 prompt set's longest batch with "
                         "these decode attentions, each optionally with a compile mode, e.g. "
                         "grouped,grouped_bmm,grouped:max-autotune (kernel time per step vs bytes read)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    torch.backends.cuda.matmul.allow_tf32 = True
    bw, _ = hbm_copy_tb_s(a.quick)
    peak, _ = matmul_peak_tflops(a.quick)
    shapes = [x for x in a.shapes.split(",") if x]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; have {sorted(SHAPES)}")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "hbm_copy_tb_s": bw,
              "matmul_bf16_tflops": peak, "shapes": {}}
    def write(shape: str, payload: dict) -> None:
        result["shapes"][shape] = payload
        result["wall_s"] = time.monotonic() - T0
        (out / "gpu_generation.json").write_text(json.dumps(result, indent=2, default=str))

    for shape in shapes:
        vs = [v.split(":", 1)[-1] for v in a.variants.split(",") if v and (":" not in v or v.startswith(shape + ":"))]
        write(shape, run_shape(shape, vs, a, bw, peak, tmp, on_variant=lambda payload, s=shape: write(s, payload)))
    print(f"\n{result['device']}  HBM copy {bw:.2f} TB/s  bf16 matmul {peak:.0f} TFLOP/s")
    hdr = ("shape", "variant", "tok/s", "J/tok", "avg W", "% roofline", "decode % roofline", "% kv-roofline",
           "% prefill+decode roofline", "prefill %", "ms/step", "warm-up s", "recompiles")
    lines = [" | ".join(hdr)]
    for shape, payload in result["shapes"].items():
        for r in payload.get("runs", []):
            if "tokens_per_s" not in r:
                lines.append(f"{shape} | {r['variant']} | {r.get('error', r.get('skipped', '?'))[:120]}")
                continue
            f = lambda k, fmt, scale=1, r=r: (fmt.format(scale * r[k]) if r.get(k) is not None else "-")  # noqa: E731
            kv = 100 * r["tokens_per_s"] / r["kv_roofline_tokens_per_s"] if r.get("kv_roofline_tokens_per_s") \
                else None
            lines.append(" | ".join([
                shape, r["variant"], f"{r['tokens_per_s']:,.0f}", f("j_per_token", "{:.4f}"), f("gpu_avg_w", "{:.0f}"),
                f"{100 * r['fraction_of_roofline']:.1f}", f("decode_fraction_of_roofline", "{:.1f}", 100),
                f"{kv:.1f}" if kv else "-", f("fraction_of_prefill_plus_decode_roofline", "{:.1f}", 100),
                f("prefill_share", "{:.0f}", 100), f("decode_ms_per_step", "{:.2f}"),
                f("warmup_first_batch_s", "{:.1f}") if "warmup_first_batch_s" in r else f("warmup_s", "{:.1f}"),
                str(r.get("recompiles_in_timed_run", "-"))]))
    text = "\n".join(lines)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
