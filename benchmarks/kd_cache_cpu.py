#!/usr/bin/env python
"""KD logit cache benchmark on CPU: bytes per position, int8 effect on the loss, cache read vs training consumption,
KD vs SFT step time for a tiny student.

    python benchmarks/kd_cache_cpu.py [--examples 256] [--steps 20] [--out results/benchmarks/kd_cache_cpu.json]

The teacher is a random-init tiny Llama whose LM head is scaled so its next-token distributions are peaked like a
trained LM's (mean top-1 probability printed); the student is the embedded default's `tiny` architecture.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill_bench.kd.cache import CacheReader, bytes_per_position, id_encoding_for, id_row_bytes
from distill_bench.kd.loss import kd_loss
from distill_bench.kd.stage import build_cache
from distill_bench.kd.trainer import KDCollator

VOCAB, K = 320, 64
REFERENCES = {"distillkit_k128_bytes_per_token": 300, "original_harness_bytes_per_position": 1600}


def synthetic_corpus(n: int, max_length: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(max_length // 3, max_length + 1))
        prompt = int(rng.integers(8, length // 2))
        ids = rng.integers(7, VOCAB, size=length).tolist()
        out.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (length - prompt)})
    return out


def random_llama(vocab_size: int, *, hidden: int, layers: int, heads: int, seed: int):
    """Random-init untied LlamaForCausalLM: throughput and cache size do not depend on what a model learned."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def peaked_teacher(seed: int):
    model = random_llama(VOCAB, hidden=64, layers=2, heads=4, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("shard-"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps for KD and for SFT")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings on a shared CPU; many small ops suffer from contention)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = synthetic_corpus(args.examples, args.max_length, args.seed)
    teacher = peaked_teacher(args.seed)
    res: dict = {"vocab_size": VOCAB, "k": K, "examples": args.examples, "max_length": args.max_length,
                 "torch_threads": torch.get_num_threads(), "references": REFERENCES}
    work = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    caches = {}
    for dtype in ("float16", "bfloat16", "int8"):
        d = work / dtype
        t0 = time.perf_counter()
        manifest, stats = build_cache(teacher, corpus, d, k=K, value_dtype=dtype, temperatures=[1.0], batch_size=32,
                                      pad_token_id=0, meta={"tokenizer_vocab_hash": "bench"})
        caches[dtype] = d
        n = manifest["n_positions"]
        res[f"cache_{dtype}"] = {
            "positions": n, "build_s": time.perf_counter() - t0,
            "teacher_input_tokens_per_s": stats["input_tokens"] / (time.perf_counter() - t0),
            "bytes_per_position_layout": manifest["bytes_per_position"],
            "bytes_per_position_on_disk": dir_bytes(d) / n,
            "bytes_per_entry_values_ids": (manifest["bytes_per_position"] - 4 - (4 if dtype == "int8" else 0)) / K,
            "bytes_per_entry_all": dir_bytes(d) / n / K,
        }
    res["layout_other"] = {
        "fp16_k64_vocab100k_packed17": bytes_per_position(64, "float16", 100_278),
        "fp16_k128_vocab100k_packed17": bytes_per_position(128, "float16", 100_278),
        "int8_k128_vocab100k_packed17": bytes_per_position(128, "int8", 100_278),
        "id_bytes_per_entry_vocab100k": id_row_bytes(id_encoding_for(100_278), 64) / 64,
    }

    # teacher sharpness (so the int8 comparison is on LM-like distributions)
    r = CacheReader(caches["float16"])
    top1 = np.concatenate([np.exp(r.get(i).values[:, 0]) for i in range(min(64, args.examples))])
    tailm = np.concatenate([np.exp(r.get(i).tail[:, 0]) for i in range(min(64, args.examples))])
    res["teacher_mean_top1_prob"] = float(top1.mean())
    res["teacher_mean_tail_mass_k64"] = float(tailm.mean())

    student = random_llama(VOCAB, hidden=64, layers=2, heads=4, seed=args.seed + 1)
    examples = [dict(e, example_index=i) for i, e in enumerate(corpus)]
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]

    # int8 / bf16 vs fp16 KD loss on the same batches: a random student (large KL) and a student close to the teacher
    # (teacher weights perturbed, small KL: the hard case for relative error)
    near = peaked_teacher(args.seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed + 7)
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    diffs = {}
    for (student_name, stu), alpha in [(("random", student), 0.5), (("random", student), 0.0),
                                       (("near_teacher", near), 0.5), (("near_teacher", near), 0.0)]:
        tot = {}
        for dtype in ("float16", "bfloat16", "int8"):
            col = KDCollator(str(caches[dtype]), pad_token_id=0, top_k=K, temperature=1.0)
            s = 0.0
            with torch.no_grad():
                for b in batches:
                    x = col(b)
                    logits = stu(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
                    s += kd_loss(logits, x["labels"], x["kd_ids"], x["kd_values"], x["kd_tail"], alpha=alpha,
                                 temperature=1.0)[0].item()
            tot[dtype] = s / len(batches)
        diffs[f"{student_name}_alpha{alpha}"] = {**{f"loss_{k}": v for k, v in tot.items()},
                                  "int8_rel_diff_vs_fp16": abs(tot["int8"] - tot["float16"]) / tot["float16"],
                                  "bf16_rel_diff_vs_fp16": abs(tot["bfloat16"] - tot["float16"]) / tot["float16"]}
    res["loss_effect"] = diffs

    # cache read throughput through the collator (all batches, memmapped, one process)
    col = KDCollator(str(caches["float16"]), pad_token_id=0, top_k=K, temperature=1.0)
    col(batches[0])
    t0 = time.perf_counter()
    n_pos = 0
    for _ in range(3):
        for b in batches:
            n_pos += col(b)["kd_ids"].shape[0]
    res["collator_positions_per_s"] = n_pos / (time.perf_counter() - t0)

    # KD vs SFT training steps (forward + backward + AdamW), same batches
    def steps(mode: str) -> tuple[float, int]:
        model = random_llama(VOCAB, hidden=64, layers=2, heads=4, seed=args.seed + 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pre = [col(b) for b in batches]
        total_pos, times = 0, []
        for i in range(args.steps + 2):
            x = pre[i % len(pre)]
            t = time.perf_counter()
            if mode == "kd":
                logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
                loss = kd_loss(logits, x["labels"], x["kd_ids"], x["kd_values"], x["kd_tail"], alpha=0.5,
                               temperature=1.0)[0]
            else:
                loss = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=x["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:                          # two warm-up steps
                times.append(time.perf_counter() - t)
                total_pos += x["kd_ids"].shape[0]
        return float(np.median(times)), total_pos / sum(times)

    kd_step, kd_pos_s = steps("kd")
    sft_step, sft_pos_s = steps("sft")
    res["kd_step_s_median"], res["sft_step_s_median"] = kd_step, sft_step
    res["kd_vs_sft_step_ratio"] = kd_step / sft_step
    res["kd_training_positions_per_s"] = kd_pos_s
    res["sft_training_positions_per_s"] = sft_pos_s
    res["read_vs_consumption_ratio"] = res["collator_positions_per_s"] / kd_pos_s

    f16, i8 = res["cache_float16"], res["cache_int8"]
    worst_int8 = max(v["int8_rel_diff_vs_fp16"] for v in diffs.values())
    worst_bf16 = max(v["bf16_rel_diff_vs_fp16"] for v in diffs.values())
    res["int8_worst_rel_diff_vs_fp16"], res["bf16_worst_rel_diff_vs_fp16"] = worst_int8, worst_bf16
    rows = [
        ("fp16 values + uint16 ids, k=64: B/position (layout | on disk)",
         f"{f16['bytes_per_position_layout']} | {f16['bytes_per_position_on_disk']:.1f}", "≤256 (entries)"),
        ("fp16: B per kept entry (values+ids | incl. normaliser)",
         f"{f16['bytes_per_entry_values_ids']:.2f} | {f16['bytes_per_entry_all']:.2f}", "≤4"),
        ("int8: B per kept entry (values+ids | incl. offset/scale/normaliser)",
         f"{i8['bytes_per_entry_values_ids']:.2f} | {i8['bytes_per_entry_all']:.2f}", "≤3"),
        *[(f"KD loss rel. diff vs fp16, {name} (int8 | bf16)",
           f"{v['int8_rel_diff_vs_fp16']:.3%} | {v['bf16_rel_diff_vs_fp16']:.3%}", "int8 ≤1%")
          for name, v in diffs.items()],
        ("vocab 100k (17-bit ids) fp16 k=64 | k=128: B/position",
         f"{res['layout_other']['fp16_k64_vocab100k_packed17']} | {res['layout_other']['fp16_k128_vocab100k_packed17']}",
         "DistillKit ≈300 @k=128; original ≈1600"),
        ("teacher mean top-1 prob | tail mass beyond k=64",
         f"{res['teacher_mean_top1_prob']:.3f} | {res['teacher_mean_tail_mass_k64']:.2e}", "-"),
        ("cache read through collator: positions/s", f"{res['collator_positions_per_s']:,.0f}", "≫ consumption"),
        ("KD training consumption: positions/s", f"{kd_pos_s:,.0f}", "-"),
        ("read / consumption", f"{res['read_vs_consumption_ratio']:.1f}x", ">1"),
        ("KD step | SFT step (median s)", f"{kd_step * 1e3:.1f} ms | {sft_step * 1e3:.1f} ms", "-"),
        ("KD / SFT step time", f"{res['kd_vs_sft_step_ratio']:.2f}", "GPU target ≤1.10"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"KD cache benchmark (CPU, {res['torch_threads']} threads, vocab {VOCAB}, {args.examples} examples)")
    for name, val, target in rows:
        print(f"  {name:<{w}}  {val:>22}   target {target}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
