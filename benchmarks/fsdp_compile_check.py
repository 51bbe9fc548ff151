"""Does a decoder layer compiled before FSDP shards it train the same model? One process is enough to ask.

    torchrun --nproc-per-node=1 benchmarks/fsdp_compile_check.py --out DIR          # a GPU, OLMo-2-1B shape
    torchrun --nproc-per-node=2 benchmarks/fsdp_compile_check.py --out DIR --quick  # CPU, gloo, tiny shape

The trainer's `torch_compile: layers` compiles each decoder layer in place (`nn.Module.compile`) and the HF Trainer
then shards the model with FSDP2 (`fully_shard` per decoder layer and on the root). In-place compilation compiles
the module's whole `__call__`, so FSDP's pre/post-forward hooks, which gather and free the layer's parameters, run
inside the compiled region. Three ways over the same seeded model, batches and optimizer, all sharded:

  none      no compilation (what `torch_compile: auto` resolves to under FSDP)
  inplace   `layer.compile()` before `fully_shard` (what `layers` would do under FSDP)
  forward   `layer.forward = torch.compile(layer.forward)` before `fully_shard` (the hooks stay outside)

Per way: the loss and gradient norm of every step (finite?), the largest relative loss difference to `none`, and the
steady step time. Prints a table and writes fsdp_compile_check.json (rank 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import offline_env  # noqa: F401  (sets the offline environment before transformers loads)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gpu_suite import OLMO2_1B, TINY  # noqa: E402

WAYS = ("none", "inplace", "forward")


def build(shape: dict, device: torch.device, way: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    with device:
        model = Olmo2ForCausalLM(Olmo2Config(**shape, attn_implementation="sdpa"))
    layers = list(model.model.layers)
    for layer in layers:
        if way == "inplace":
            layer.compile()
        elif way == "forward":
            layer.forward = torch.compile(layer.forward)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def train(shape: dict, device: torch.device, way: str, steps: int, batch: int, length: int) -> dict:
    model = build(shape, device, way)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    data = [torch.randint(0, shape["vocab_size"], (batch, length), generator=gen) for _ in range(steps)]
    losses, norms, times = [], [], []
    for ids in data:
        ids = ids.to(device)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        losses.append(float(loss.detach()))   # reading it waits for the step: the time below is the step's
        norms.append(float(norm))
        times.append(time.perf_counter() - t)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    steady = times[2:] or times
    return {"losses": losses, "grad_norms": norms, "finite": all(map(math.isfinite, losses + norms)),
            "first_step_s": times[0], "steady_step_s": sum(steady) / len(steady)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shape on CPU (gloo)")
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.quick
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shape = TINY if a.quick else OLMO2_1B
    batch, length = (2, 32) if a.quick else (4, 1024)
    steps = 3 if a.quick else a.steps
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "world_size": dist.get_world_size(),
              "torch": torch.__version__, "shape": "tiny" if a.quick else "olmo2-1b", "batch": batch,
              "length": length, "ways": {}}
    for way in a.ways.split(","):
        if way not in WAYS:
            raise SystemExit(f"unknown way {way!r}; known: {WAYS}")
        try:
            result["ways"][way] = train(shape, device, way, steps, batch, length)
        except Exception as exc:  # noqa: BLE001 - one failing way must not hide the others
            result["ways"][way] = {"error": repr(exc)[:400], "finite": False}
    ref = result["ways"].get("none", {}).get("losses")
    for r in result["ways"].values():
        if ref and r.get("losses"):
            r["max_rel_loss_diff_vs_none"] = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref))
    if rank == 0:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp_compile_check.json").write_text(json.dumps(result, indent=2))
        print(f"{result['device']} x {result['world_size']}, {result['shape']}, batch {batch} x {length}")
        print("way | finite | first loss | last loss | max rel diff vs none | step 1 s | steady step s | error")
        for way, r in result["ways"].items():
            if "error" in r:
                print(f"{way} | no | | | | | | {r['error']}")
                continue
            print(f"{way} | {'yes' if r['finite'] else 'NO'} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | "
                  f"{r.get('max_rel_loss_diff_vs_none', 0):.2e} | {r['first_step_s']:.2f} | "
                  f"{r['steady_step_s']:.3f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
