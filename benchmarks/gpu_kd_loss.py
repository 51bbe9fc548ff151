#!/usr/bin/env python
"""The loss alone: SFT's cross-entropy against the KD loss on the same [N, V] loss rows, forward and backward, so the
KD step's extra GPU time is measured apart from the model, the optimizer and the data.

    python benchmarks/gpu_kd_loss.py --out benchmarks/results/DIR [--positions 2345] [--vocab 100352] [--k 64]
    python benchmarks/gpu_kd_loss.py --out DIR --quick     # small sizes on CPU (tests/test_benchmarks.py)

The loss rows are bf16 and require a gradient, as the trainer's head gives them (2,345 positions: the mean of a
batch of 4 at the benchmark's lengths). Variants:
  ce           F.cross_entropy(logits.float(), targets) / N: the SFT trainer's loss
  kd           distill_bench.kd.loss.kd_loss as the KD trainer calls it (alpha 0.5, tau 1)
  kd_tau2      the same at tau 2 (a second log-softmax)
  kd_compiled  kd_loss with its per-chunk terms compiled (compiled_terms=True: the KD trainer's path when its decoder
               layers are compiled, i.e. the GPU default)
  kd_tau2_compiled  the same at tau 2
Per variant: median ms per forward + backward over --reps calls (CUDA events on a GPU), the number of GPU kernels one
call launches and the top kernels by time (torch.profiler), and the loss and largest gradient difference to the
eager loss at the same temperature.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_bench.kd import loss as loss_mod  # noqa: E402


def make_inputs(n: int, vocab: int, k: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)]).to(device)
    values = torch.sort(-5 * torch.rand(n, k, generator=g), dim=1, descending=True).values.to(device)
    values = values - torch.logsumexp(torch.cat([values, torch.zeros(n, 1, device=device) - 6], 1), 1,
                                      keepdim=True)
    tail = torch.full((n,), -6.0, device=device)
    rows = torch.zeros(n, dtype=torch.long, device=device)
    cols = torch.arange(n, device=device)
    return {"logits": logits, "targets": targets, "ids": ids, "values": values, "tail": tail,
            "positions": (rows, cols, targets)}


def loss_fn(variant: str, x: dict):
    if variant == "ce":
        def run(z):
            return F.cross_entropy(z.float(), x["targets"], reduction="sum") / x["targets"].numel()
        return run
    tau = 2.0 if variant.startswith("kd_tau2") else 1.0
    compiled = variant.endswith("_compiled")

    def run(z):
        loss, _ = loss_mod.kd_loss(z, None, x["ids"], x["values"], x["tail"], alpha=0.5, temperature=tau,
                                   positions=x["positions"], ids_checked=True, compiled_terms=compiled)
        return loss
    return run


def grad_of(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.detach().requires_grad_(True)
    loss = fn(z)
    loss.backward()
    return loss.detach(), z.grad


def time_calls(fn, logits: torch.Tensor, reps: int, cuda: bool) -> list[float]:
    z = logits.detach().requires_grad_(True)
    times = []
    for _ in range(reps):
        z.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(z).backward()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn(z).backward()
            times.append((time.perf_counter() - t) * 1000)
    return times


def kernel_table(fn, logits: torch.Tensor, cuda: bool, top: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    z = logits.detach().requires_grad_(True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn(z).backward()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:   # kernel rows; the attribute's name changed across torch versions
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        rows = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and getattr(e, key) > 0]
    else:
        rows = [e for e in events if e.key.startswith("aten::")]
        key = "self_cpu_time_total"
    rows.sort(key=lambda e: -getattr(e, key))
    return {"kernels": int(sum(e.count for e in rows)) if cuda else None,
            "top": [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, key) / 1000} for e in rows[:top]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--positions", type=int, default=2345)
    ap.add_argument("--vocab", type=int, default=100352)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="ce,kd,kd_compiled,kd_tau2,kd_tau2_compiled")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n, vocab, k, reps = (a.positions, a.vocab, a.k, a.reps) if not a.quick else (48, 512, 8, 3)
    x = make_inputs(n, vocab, k, device)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "positions": n, "vocab": vocab, "k": k,
           "reps": reps, "torch": torch.__version__, "runs": []}
    reference = {tau_name: grad_of(loss_fn(tau_name, x), x["logits"]) for tau_name in ("kd", "kd_tau2")}
    for variant in a.variants.split(","):
        fn = loss_fn(variant, x)
        t0 = time.perf_counter()
        loss, grad = grad_of(fn, x["logits"])   # the first call pays any compilation
        first_s = time.perf_counter() - t0
        times = time_calls(fn, x["logits"], reps, cuda)
        kernels = kernel_table(fn, x["logits"], cuda)
        row = {"variant": variant, "median_ms": statistics.median(times), "min_ms": min(times),
               "first_call_s": first_s, "loss": float(loss), **kernels}
        if variant.startswith("kd"):   # against the eager loss at the same temperature
            ref_loss, ref_grad = reference["kd_tau2" if variant.startswith("kd_tau2") else "kd"]
            row["loss_diff_to_eager"] = float(loss) - float(ref_loss)
            row["max_grad_diff_to_eager"] = float((grad.float() - ref_grad.float()).abs().max())
        res["runs"].append(row)
        print(f"{variant}: {row['median_ms']:.2f} ms (min {row['min_ms']:.2f}), kernels {row['kernels']}", flush=True)
    ce = next((r for r in res["runs"] if r["variant"] == "ce"), None)
    print(f"{res['device']}, {n} loss rows x vocab {vocab}, top-{k}")
    print("variant | ms per forward + backward | minus CE | GPU kernels | first call s")
    print("---|---|---|---|---")
    for r in res["runs"]:
        extra = f"{r['median_ms'] - ce['median_ms']:+.2f}" if ce else "-"
        print(f"{r['variant']} | {r['median_ms']:.2f} | {extra} | {r['kernels']} | {r['first_call_s']:.1f}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_kd_loss.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
