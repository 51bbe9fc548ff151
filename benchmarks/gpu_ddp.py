"""Issue 9 must-show 3: DDP on 2 GPUs vs 1 GPU at equal global batch, through the real train stage and meter.

    python benchmarks/gpu_ddp.py --out DIR [--quick]

Builds the embedded arithmetic task, a tokenizer and a >=100M-parameter Llama student (random init), then runs the
``train_student`` stage (distill_bench.stages.run_named_stage, so the StageMeter and stage JSON are the workflow's)
twice: training.gpus=1, batch 2B on GPU 0 only, and training.gpus=2, batch B per GPU (torchrun launched by the stage
itself, distill_bench.train.launch). Prints both loss curves, their largest relative difference, throughput and
per-device energy from the stage JSONs. --quick: tiny model, CPU/gloo.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def arith(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append((f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
                    f"He has {a} and buys {b}, so {a} + {b} = {a + b}.\n#### {a + b}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    from datasets import Dataset, DatasetDict

    from distill_bench.models.build import init_model_from_arch, save_model_dir
    from distill_bench.models.stage import encode_split, load_split
    from distill_bench.models.tokenizer import load_tokenizer, train_tokenizer
    from distill_bench.stages import run_named_stage
    from distill_bench.train.budget import build_budgeted_dataset, trained_positions

    out = Path(a.out)
    work = Path("/tmp/ddp_work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pairs = arith(4096)
    train_tokenizer([t for p, r in pairs[:2000] for t in (p, r)], 2000, work / "tok")
    tok = load_tokenizer(work / "tok")
    cols = lambda items, name: {"id": [f"a-{name}-{i}" for i in range(len(items))],  # noqa: E731
                                "prompt": [p for p, _ in items], "response": [r for _, r in items],
                                "answer": [r.split("#### ")[-1] for _, r in items],
                                "source": ["embedded"] * len(items)}
    DatasetDict({"train": Dataset.from_dict(cols(pairs, "train")),
                 "eval": Dataset.from_dict(cols(pairs[:16], "eval"))}).save_to_disk(str(work / "data"))
    arch = ({"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64} if a.quick else
            {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "intermediate_size": 4096})
    model = init_model_from_arch(arch, tok, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    save_model_dir(model, work / "init", tok)
    del model
    per_gpu = 4 if a.quick else 16
    steps = 4 if a.quick else a.steps
    examples, _ = encode_split(tok, load_split(str(work / "data"), "train"), 128)
    epoch = sum(trained_positions(e["completion_mask"]) for e in examples)
    stream, _ = build_budgeted_dataset(examples, epoch, seed=0)
    budget = sum(trained_positions(e["completion_mask"]) for e in stream[:2 * per_gpu * steps])
    precision = "fp32" if a.quick else "bf16"
    base = dict(token_budget=budget, max_length=128, grad_accum=1, lr=1e-3, warmup_ratio=0.1,
                lr_scheduler="cosine", precision=precision, save_steps=10_000, logging_steps=1)
    rows = {}
    for gpus in (1, 2):
        env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not a.quick:
            os.environ["CUDA_VISIBLE_DEVICES"] = "0" if gpus == 1 else "0,1"  # the meter measures the job's GPUs
        t0 = time.time()
        summary = run_named_stage(
            "train_student", out_json=out / f"ddp_gpus{gpus}.json",
            meter_args={"stage_id": f"student.train.ddp_gpus{gpus}", "role": "student", "pipeline": "sft_gt",
                        "energy": {"codecarbon": False, "sample_interval_s": 0.1}},
            kwargs=dict(pipeline="sft_gt", dataset=str(work / "data"), tokenizer=str(work / "tok"),
                        init_model=str(work / "init"), out_dir=str(work / f"s{gpus}"), seed=0,
                        training={**base, "batch_size": per_gpu * (3 - gpus), "gpus": gpus}))
        wall = time.time() - t0
        if env_before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
        rec = json.loads((out / f"ddp_gpus{gpus}.json").read_text())
        rows[gpus] = {"loss_curve": summary["loss_curve"], "steps": summary["steps"],
                      "trained_tokens": rec["tokens"]["counts"].get("trained_tokens"), "wall_s": wall,
                      "duration_s": rec["duration_s"], "energy_per_device_j": rec["energy"]["per_device_j"],
                      "energy_gpu_j": rec["energy"]["gpu_j"], "hosts": rec["hosts"],
                      "devices": [d.get("name") for d in (rec["devices"]["gpu"] or {}).get("devices", [])]
                      if isinstance(rec["devices"]["gpu"], dict) else rec["devices"]["gpu"],
                      "distributed": rec["metrics"].get("distributed"), "status": rec["status"]}
    c1 = [loss for _, loss in rows[1]["loss_curve"]]
    c2 = [loss for _, loss in rows[2]["loss_curve"]]
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(c1, c2)]
    result = {"params": n_params, "arch": arch, "per_gpu_batch": per_gpu, "global_batch": 2 * per_gpu,
              "token_budget": budget, "precision": precision, "runs": rows,
              "max_rel_loss_diff": max(rel) if rel else None, "mean_rel_loss_diff": sum(rel) / len(rel) if rel else None}
    (out / "ddp_summary.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, default=str))
    print("step | loss 1 GPU | loss 2 GPUs | rel diff")
    for (s, x), y, r in zip(rows[1]["loss_curve"], c2, rel):
        print(f"{s:4d} | {x:.5f} | {y:.5f} | {r:.2e}")
    for g in (1, 2):
        r = rows[g]
        print(f"gpus={g}: steps {r['steps']}, trained {r['trained_tokens']} tok, {r['duration_s']:.1f} s, "
              f"gpu_j {r['energy_gpu_j']}, per device {r['energy_per_device_j']}, hosts {r['hosts']}, "
              f"status {r['status']}, ranks {json.dumps((r['distributed'] or {}).get('ranks'), default=str)[:400]}")


if __name__ == "__main__":
    main()
