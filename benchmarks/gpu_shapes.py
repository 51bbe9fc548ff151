"""Cost of a batch shape the process has not seen before (issue 10): why variable-length batches slow training.

    python benchmarks/gpu_shapes.py --out DIR            # OLMo-2-0425-1B shape, needs a CUDA GPU
    python benchmarks/gpu_shapes.py --out DIR --quick    # tiny shapes on CPU (checks the code path)

One training step of the student (fp32 master weights, bf16 autocast, fused AdamW; forward, backward, optimizer) on
a padding-free row of T tokens (4 documents, position_ids), timed with a synchronised wall clock per step:
pass 1 at N distinct new lengths T, pass 2 at the same N lengths again (each now seen once), pass 3 at N new
lengths rounded up to a multiple of 64 (first seen), pass 4 the pass-3 lengths again. Median and mean step time per
pass; the difference between first-seen and seen is the per-new-shape cost a run pays on nearly every step when
its batch lengths vary freely. A matmul-only version (the three linear shapes of a decoder layer, forward and
backward) separates cuBLAS's share from the rest; the caching allocator's device mallocs/frees/retries per pass
show its share (run once more with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_suite import OLMO2_1B, TINY, allocator_counters, dev, make_model, sync  # noqa: E402


def step_fn(model, opt, quick: bool):
    d = dev()
    vocab = model.config.vocab_size

    def step(T: int) -> float:
        lens = [T // 4] * 3 + [T - 3 * (T // 4)]
        pos = torch.cat([torch.arange(n) for n in lens])[None].to(d)
        ids = torch.randint(4, vocab, (1, T), device=d)
        sync()
        t = time.perf_counter()
        with torch.autocast(d.type, dtype=torch.bfloat16, enabled=d.type == "cuda"):
            out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    return step


def matmul_fn(K: int, N: int):
    d = dev()
    dt = torch.bfloat16 if d.type == "cuda" else torch.float32
    shapes = [(K, K), (K, 4 * K), (4 * K, K)]   # q/k/v/o, gate/up, down
    ws = [torch.randn(o, i, device=d, dtype=dt, requires_grad=True) for i, o in shapes]

    def step(T: int) -> float:
        xs = [torch.randn(T, i, device=d, dtype=dt, requires_grad=True) for i, _ in shapes]
        sync()
        t = time.perf_counter()
        for x, w in zip(xs, ws):
            y = torch.nn.functional.linear(x, w)
            y.backward(torch.ones_like(y))
        sync()
        return time.perf_counter() - t

    return step


def passes(step, lengths: list[int], rounded: list[int]) -> dict:
    res = {}
    for name, ls in (("new", lengths), ("seen", lengths), ("new_x64", rounded), ("seen_x64", rounded)):
        before = allocator_counters()
        ts = [step(T) for T in ls]
        after = allocator_counters()
        res[name] = {"median_ms": 1e3 * statistics.median(ts), "mean_ms": 1e3 * statistics.fmean(ts),
                     "distinct_lengths": len(set(ls)), "steps": len(ls),
                     "allocator": {k: after[k] - before[k] for k in after}}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=24, help="distinct lengths per pass")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="keep SDPA off cuDNN's attention (it builds an execution plan per new shape)")
    a = ap.parse_args()
    if a.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    quick = a.quick
    rng = random.Random(7)
    lo, hi = (64, 256) if quick else (2048, 8192)
    pool = rng.sample(range(lo, hi), 4 * a.n)
    lengths = [T for T in pool if T % 64][:a.n]
    rounded = sorted({-(-T // 64) * 64 for T in pool[2 * a.n:]})[:a.n]
    rng.shuffle(rounded)
    cfg = TINY if quick else OLMO2_1B
    model = make_model(cfg, torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev().type == "cuda")
    step = step_fn(model, opt, quick)
    for T in (lo + 1, lo + 3):   # process warm-up (cuBLAS handles, allocator), at lengths not used below
        step(T)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
              "cudnn_sdpa": torch.backends.cuda.cudnn_sdp_enabled(),
              "model": "tiny" if quick else "OLMo-2-0425-1B shape, random init", "train_step": passes(step, lengths,
                                                                                                     rounded)}
    del model, opt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mm = matmul_fn(cfg["hidden_size"], cfg["intermediate_size"])
    shift = [T + 7 for T in lengths]        # lengths the matmuls have not met in the model pass
    shift_r = [T + 64 * 200 for T in rounded]
    for T in (lo + 5, lo + 9):
        mm(T)
    result["matmuls_one_layer"] = passes(mm, shift, shift_r)
    (out / "gpu_shapes.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}  {result['model']}")
    print(f"PYTORCH_CUDA_ALLOC_CONF={result['alloc_conf']!r}  cuDNN SDPA {'on' if result['cudnn_sdpa'] else 'off'}")
    print("measure | pass | distinct lengths | median ms | mean ms | allocator (device mallocs, frees, retries)")
    for m in ("train_step", "matmuls_one_layer"):
        for name, r in result[m].items():
            al = r["allocator"]
            counts = f"{al['num_device_alloc']}, {al['num_device_free']}, {al['num_alloc_retries']}" if al else "-"
            print(f"{m} | {name} | {r['distinct_lengths']} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} | {counts}")


if __name__ == "__main__":
    main()
