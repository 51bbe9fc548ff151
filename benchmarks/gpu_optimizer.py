"""The AdamW step over a 1B student's parameters, each implementation against the bytes it must move.

    python benchmarks/gpu_optimizer.py --out DIR            # OLMo-2-0425-1B shape, fp32 parameters, needs a CUDA GPU
    python benchmarks/gpu_optimizer.py --out DIR --quick    # tiny shape on CPU (checks the code paths only)

Why: at batch 4 the optimizer step is about a sixth of a 1B student's training step and it is bound by memory traffic
(docs/BENCHMARKS.md). This times the step alone, with the trainer's parameter groups (decay on matrices, none on
norms) and gradients already in place, so each implementation is compared on its own.

Variants (bytes each must move per parameter, fp32):
  hf_default      clip_grad_norm_ then fused AdamW (HF's step with training.optim auto): norm 4, scale 8, update 28
  fused           fused AdamW alone, no clip: 28 (the kernel the others build on)
  fused_clip      training.optim adamw_fused_clip: norm 4, update 28
  compiled_clip   training.optim adamw_compiled_clip: norm 4, update 28
  flat_bound      adamw_compiled_clip's update over one flat buffer per role: norm 4, update 28; no real model
                  keeps its parameters in one buffer, so this is the bound for these bytes in one kernel
Each row: ms per step (CUDA events over timed steps after warm-up), bytes at the same call's copy rate, host time
to enqueue a step, and the parameters' largest difference from hf_default's after the same three steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_suite import OLMO2_1B, TINY, Timer, dev, hbm_copy_tb_s, make_model, sync  # noqa: E402

from distill_bench.train.optim import (  # noqa: E402
    clipped_adamw_update, clipped_fused_adamw_class, compiled_clip_adamw_class)

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.1, 1.0
BYTES_PER_PARAM = {"hf_default": 40, "fused": 28, "fused_clip": 32, "compiled_clip": 32, "flat_bound": 32}


def groups(params: list[torch.Tensor]) -> list[dict]:
    """The trainer's weight-decay groups: decay on matrices, none on norm weights and biases."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def stepper(name: str, params: list[torch.Tensor]):
    """A no-argument function that runs one optimizer step of the variant over ``params`` (gradients in place)."""
    if name == "hf_default":
        opt = torch.optim.AdamW(groups(params), lr=LR, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
        return step
    if name == "fused":
        return torch.optim.AdamW(groups(params), lr=LR, fused=True).step
    if name in ("fused_clip", "compiled_clip"):
        cls = clipped_fused_adamw_class() if name == "fused_clip" else compiled_clip_adamw_class()
        return cls(groups(params), lr=LR, max_grad_norm=MAX_GRAD_NORM).step
    if name == "flat_bound":
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        m, v = torch.zeros_like(flat), torch.zeros_like(flat)
        count = torch.zeros((), device=flat.device)
        lr = torch.tensor(LR, device=flat.device)
        update = torch.compile(clipped_adamw_update, fullgraph=True, dynamic=False)

        def step():
            norm = torch.linalg.vector_norm(grad)
            update([flat], [grad], [m], [v], [count], lr, norm, 0.9, 0.999, 1e-8, WEIGHT_DECAY, MAX_GRAD_NORM)
        return step
    raise ValueError(name)


def run(name: str, params, grads0, start, reference, *, warmup: int, steps: int, copy_tb_s: float) -> dict:
    def reset():
        with torch.no_grad():
            for p, g, s in zip(params, grads0, start):
                p.copy_(s)
                p.grad = g.clone()

    reset()
    step = stepper(name, params)
    tc = time.perf_counter()
    step()   # first step: state allocation and, for the compiled ones, compilation
    sync()
    first_s = time.perf_counter() - tc
    for _ in range(warmup):
        step()
    host = []
    with Timer() as t:
        for _ in range(steps):
            h = time.perf_counter()
            step()
            host.append(time.perf_counter() - h)
    ms = t.s / steps * 1e3
    n = sum(p.numel() for p in params)
    nbytes = BYTES_PER_PARAM[name] * n
    ideal_ms = nbytes / (copy_tb_s * 1e12) * 1e3
    res = {"variant": name, "ms_per_step": ms, "bytes_per_param": BYTES_PER_PARAM[name], "gb_per_step": nbytes / 1e9,
           "ms_at_copy_rate": ideal_ms, "fraction_of_copy_rate": ideal_ms / ms,
           "host_ms_per_step": sum(host) / len(host) * 1e3, "first_step_s": first_s, "timed_steps": steps}
    del step
    if name != "flat_bound":   # the same three steps from the same start, against hf_default's parameters
        reset()
        step = stepper(name, params)
        for _ in range(3):
            step()
        sync()
        if reference:
            res["max_abs_diff_vs_hf_default"] = max(float((p.detach() - r).abs().max())
                                                    for p, r in zip(params, reference))
        else:
            reference.extend(p.detach().clone() for p in params)
            res["max_abs_diff_vs_hf_default"] = 0.0
        del step
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shape on CPU")
    ap.add_argument("--variants", default=",".join(BYTES_PER_PARAM), help="comma list (hf_default first: the "
                                                                            "others are compared with it)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TINY if a.quick else OLMO2_1B
    model = make_model(cfg, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    # gradients with ten times the clip threshold's norm at any shape, so every clipping variant scales
    grads0 = [torch.randn_like(p) for p in params]
    scale = 10 * MAX_GRAD_NORM / float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads0])))
    grads0 = [g.mul_(scale) for g in grads0]
    start = [p.detach().clone() for p in params]
    copy_tb_s, _ = hbm_copy_tb_s(a.quick)
    print(f"{sum(p.numel() for p in params):,} parameters in {len(params)} tensors; copy rate {copy_tb_s:.2f} TB/s",
          flush=True)
    reference: list[torch.Tensor] = []
    rows = []
    for name in a.variants.split(","):
        try:
            rows.append(run(name, params, grads0, start, reference, warmup=a.warmup, steps=a.steps,
                            copy_tb_s=copy_tb_s))
        except Exception as e:  # noqa: BLE001 - a variant that fails is a finding, not the end of the run
            rows.append({"variant": name, "error": repr(e)[:600]})
            print(f"{name}: {e!r}", flush=True)
    result = {"device": torch.cuda.get_device_name() if dev().type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "parameters": sum(p.numel() for p in params),
              "tensors": len(params), "copy_tb_s": copy_tb_s, "rows": rows}
    (out / "gpu_optimizer.json").write_text(json.dumps(result, indent=2))
    head = ("variant", "ms/step", "B/param", "GB/step", "ms at copy rate", "% copy rate", "host ms", "first s",
            "max |diff|")
    lines = [" | ".join(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']} | error: {r['error'][:120]}")
            continue
        diff = r.get("max_abs_diff_vs_hf_default")
        lines.append(" | ".join([r["variant"], f"{r['ms_per_step']:.2f}", str(r["bytes_per_param"]),
                                 f"{r['gb_per_step']:.1f}", f"{r['ms_at_copy_rate']:.2f}",
                                 f"{100 * r['fraction_of_copy_rate']:.1f}", f"{r['host_ms_per_step']:.2f}",
                                 f"{r['first_step_s']:.1f}", "—" if diff is None else f"{diff:.1e}"]))
    table = "\n".join(lines)
    (out / "table.txt").write_text(table + "\n")
    print(f"\n{result['device']}  copy {copy_tb_s:.2f} TB/s  {result['parameters']:,} parameters\n{table}")


if __name__ == "__main__":
    main()
