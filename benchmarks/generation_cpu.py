"""Generation throughput on this CPU: the original study's setting vs ours, same model and prompts.

original: HF ``generate``, batch 4, right padding, prompts in corpus order, "tokens" counted as every generated
          position (output width - input width, per row), i.e. including padding after a row's EOS.
ours:     ``distill_bench.generation.generate`` (left padding, length-sorted batches, large batch).

Right padding puts pad tokens between prompt and generation, so a decoder-only model's greedy output for the
shorter prompts of a batch is corrupted; the table reports how many prompts' outputs differ from the one-by-one
greedy reference. tokens/s uses the true generated-token count (up to and including EOS, no padding) for both.
Random weights are fine: throughput does not depend on what the model learned.

    python benchmarks/generation_cpu.py --out results/benchmarks/generation_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps = rng.randint(1, 8)
        nums = [rng.randint(1, 99) for _ in range(steps + 1)]
        text = f"Start with {nums[0]}. " + " ".join(f"Add {x}." for x in nums[1:]) + " What is the total?"
        out.append(text)
    return out


def run_original(model, tok, prompts, max_new_tokens, batch_size=4):
    """HF generate with right padding at batch 4, in corpus order (the original harness)."""
    import torch
    from transformers import GenerationConfig

    from distill_bench.generation.hf_backend import count_generated
    from distill_bench.generation.prompts import encode_chat, eos_ids

    eos = eos_ids(tok, model)
    ids_all = encode_chat(tok, prompts)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=sorted(eos))
    counted = true = 0
    outputs = []
    t0 = time.perf_counter()
    for start in range(0, len(ids_all), batch_size):
        batch = ids_all[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        new = out[:, width:].tolist()
        counted += len(batch) * (out.shape[1] - width)  # padding after EOS counted, as the original did
        for row in new:
            n, _ = count_generated(row, eos)
            true += n
            outputs.append(tuple(row[:n]))
    return time.perf_counter() - t0, counted, true, outputs


def run_ours(model, tok, prompts, max_new_tokens, batch_size, continuous=False):
    from distill_bench.generation import GenerationSettings, generate

    s = GenerationSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, continuous_batching=continuous)
    t0 = time.perf_counter()
    res = generate(model, tok, prompts, s)
    elapsed = time.perf_counter() - t0
    true = sum(r.generated_tokens for r in res)
    return elapsed, true, true, [r.token_ids for r in res]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="our batch size")
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--continuous-batching", action="store_true", help="also time transformers' generate_batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (interleaved); median reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from distill_bench.generation import GenerationSettings, generate
    from distill_bench.models.build import init_model_from_arch
    from distill_bench.models.tokenizer import train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the right-padding warning is the point of the baseline
    prompts = make_prompts(args.n_prompts, args.seed)
    # the workflow's own tokenizer and model builders (random weights: throughput does not depend on training)
    tok = train_tokenizer(prompts, vocab_size=256)
    model = init_model_from_arch({"hidden_size": args.hidden_size, "num_layers": args.layers, "num_heads": 4,
                                  "intermediate_size": 3 * args.hidden_size}, tok, seed=args.seed).eval()
    n_params = sum(p.numel() for p in model.parameters())
    run_ours(model, tok, prompts[:4], 2, 4)  # warm-up (allocator, kernels)

    # greedy reference, one prompt at a time: what every batched run should reproduce
    ref = [generate(model, tok, [p], GenerationSettings(max_new_tokens=args.max_new_tokens))[0].token_ids
           for p in prompts]
    rows = []
    settings = [("original: HF generate, batch 4, right padding", lambda: run_original(
                    model, tok, prompts, args.max_new_tokens)),
                (f"ours: left padding, length-sorted, batch {args.batch_size}", lambda: run_ours(
                    model, tok, prompts, args.max_new_tokens, args.batch_size))]
    if args.continuous_batching:
        settings.append(("ours: transformers continuous batching", lambda: run_ours(
            model, tok, prompts, args.max_new_tokens, args.batch_size, continuous=True)))
    # interleaved repeats, median time: the machine is shared, single runs are noisy
    runs: dict[str, list] = {name: [] for name, _ in settings}
    for _ in range(max(1, args.repeats)):
        for name, fn in settings:
            runs[name].append(fn())
    for name, _ in settings:
        times = sorted(r[0] for r in runs[name])
        elapsed = times[len(times) // 2]
        _, counted, true, outs = runs[name][0]
        rows.append({"setting": name, "seconds": elapsed, "seconds_all": times, "counted_tokens": counted,
                     "true_generated_tokens": true, "true_tokens_per_s": true / elapsed,
                     "counted_tokens_per_s": counted / elapsed,
                     "outputs_differing_from_one_by_one": sum(a != b for a, b in zip(outs, ref))})

    base = rows[0]["true_tokens_per_s"]
    print(f"model: random-init Llama, {n_params / 1e6:.2f} M params; {len(prompts)} prompts, median of {args.repeats}, "
          f"{args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    hdr = f"{'setting':<52} {'s':>7} {'true tok':>9} {'counted':>8} {'true tok/s':>10} {'speedup':>8} {'wrong':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['setting']:<52} {r['seconds']:>7.2f} {r['true_generated_tokens']:>9d} {r['counted_tokens']:>8d} "
              f"{r['true_tokens_per_s']:>10.1f} {r['true_tokens_per_s'] / base:>7.2f}x "
              f"{r['outputs_differing_from_one_by_one']:>6d}")
    print("wrong = prompts whose greedy output differs from one-by-one greedy generation")
    if args.out:
        payload = {"benchmark": "generation_cpu", "args": {k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(args).items()},
                   "model_params": n_params, "torch": torch.__version__, "transformers": transformers.__version__,
                   "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0], "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
