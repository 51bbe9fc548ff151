"""Students at the study's scale on several GPUs, through the workflow's own `train_student` stage and launcher.

    python benchmarks/gpu_multi.py --out DIR --runs sft,kd,dpo,losscheck     # 2 GPUs, OLMo-2-7B shape, FSDP
    python benchmarks/gpu_multi.py --out DIR --quick                         # tiny shapes, 2 gloo processes on CPU

Every run is `distill_bench.stages.run_named_stage("train_student", ...)` with `training.gpus: 2` and
`training.distributed: fsdp`, so the stage re-launches itself through torchrun (distill_bench.train.launch) and its
StageMeter measures both GPUs, exactly as a workflow job would. Random weights at real shapes, random-word data of
U[lo, hi] tokens (no network): the numbers are speed and energy, not quality.

Runs (each skipped, and said so, when fewer seconds are left than it is expected to need; `--budget-s`):
  sft        SFT of the `--shape` student (default OLMo-2-7B: 7.3 B parameters, fp32 master weights, bf16 autocast)
  kd         KD of the same student from a top-k cache built by the `cache_logits` stage (1B-shape random teacher of
             the same vocabulary: the teacher's size does not change the student's step)
  dpo        DPO of a `--dpo-shape` student (default OLMo-2-1B) on random-word preference pairs
  losscheck  a 134 M Llama on 1 GPU vs the same global batch on 2 GPUs with FSDP: loss curves side by side

Per run, from the stage JSON: duration, per-device GPU energy, exact tokens, the steady-state window of
`metrics.speed` (tokens/s after the warm-up steps, peak memory over ranks, the wrapper class: FSDP or DDP), and MFU =
useful FLOPs/s over (world size x the bf16 matmul peak measured here on GPU 0): 6 * N_body * input tokens + 6 *
N_head * trained tokens + 12 * L * d * E[len^2]/E[len] per input token (attention over the dataset's mean square
length; no causal halving, as gpu_trainer.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import offline_env  # noqa: E402, F401  (sets the offline environment before transformers loads)

import torch  # noqa: E402

import gpu_suite  # noqa: E402
from gpu_suite import OLMO2_1B, OLMO2_7B, OLMO2_13B, TINY  # noqa: E402

T0 = time.monotonic()
ENERGY = {"codecarbon": False, "sample_interval_s": 0.1}
SHAPES = {"olmo2-1b": OLMO2_1B, "olmo2-7b": OLMO2_7B, "olmo2-13b": OLMO2_13B, "tiny": TINY}
SMALL_LLAMA = dict(arch="llama", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                   intermediate_size=4096, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=False)
# expected seconds per run on 2 x H200 (model build + torchrun + load + compile + steps + final save); the skip rule
EXPECTED_S = {"sft": 140, "kd": 170, "dpo": 60, "losscheck": 60}
SIZE_FACTOR = {"olmo2-13b": 1.9}   # sft/kd of a larger student: saving, loading and gathering scale with its size


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ data
# 300 letter-only syllable words, few enough that each becomes one token (the tokenizer splits digits one per token,
# so numbered words would cost ~3.6 tokens each and the length range would be in the wrong unit)
WORDS = [a + b + c for a in "bcdfghjklm" for b in "aeiou" for c in "nprstx"]


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_tokenizer(work: Path):
    """A BPE over the random words (one token per word, checked), trained here: no download."""
    from distill_bench.models.tokenizer import load_tokenizer, train_tokenizer

    rng = random.Random(0)
    train_tokenizer([" ".join(WORDS)] * 4 + [random_text(rng, 200) for _ in range(200)], 2000, work / "tok")
    tok = load_tokenizer(work / "tok")
    sample = random_text(rng, 50)
    if len(tok(sample, add_special_tokens=False)["input_ids"]) != 50:
        raise RuntimeError(f"benchmark tokenizer: {sample[:40]!r}... is not one token per word")
    return tok


def make_sft_dataset(path: Path, n: int, lo: int, hi: int, seed: int = 0) -> Path:
    """prompt/response rows of random words; total length ~ U[lo, hi] words, response = the second half."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(seed)
    rows = {"id": [], "prompt": [], "response": [], "answer": [], "source": []}
    for i in range(n):
        total = rng.randint(lo, hi)
        rows["id"].append(f"r-{i}")
        rows["prompt"].append(random_text(rng, total // 2))
        rows["response"].append(random_text(rng, total - total // 2))
        rows["answer"].append("")
        rows["source"].append("embedded")
    ds = Dataset.from_dict(rows)
    DatasetDict({"train": ds, "eval": ds.select(range(min(8, n)))}).save_to_disk(str(path))
    return path


def make_pairs(path: Path, n: int, words: int, seed: int = 1) -> Path:
    from datasets import Dataset, DatasetDict

    rng = random.Random(seed)
    rows = [{"prompt_id": str(i), "prompt": random_text(rng, words), "chosen": random_text(rng, words),
             "rejected": random_text(rng, words), "chosen_score": 1.0, "rejected_score": 0.0} for i in range(n)]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def encoded(tok, dataset: Path, max_length: int) -> list[dict]:
    from distill_bench.models.stage import encode_split, load_split

    examples, _ = encode_split(tok, load_split(str(dataset), "train"), max_length)
    return examples


def budget_for_steps(examples: list[dict], n_examples: int, seed: int) -> int:
    """Token budget whose stream is exactly the first ``n_examples`` of the seed's shuffle (whole batches)."""
    from distill_bench.train.budget import build_budgeted_dataset, trained_positions

    epoch = sum(trained_positions(e["completion_mask"]) for e in examples)
    stream, _ = build_budgeted_dataset(examples, epoch * (-(-n_examples // len(examples))), seed)
    return sum(trained_positions(e["completion_mask"]) for e in stream[:n_examples])


def save_random_model(cfg: dict, path: Path, tok, dtype=torch.float32) -> dict:
    """A random-initialised model of ``cfg``'s shape, built on the device (fast), saved as an HF dir."""
    from distill_bench.models.build import save_model_dir

    model = gpu_suite.make_model(cfg, dtype)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "matmul_parameters": gpu_suite.matmul_params(model),
            "head_parameters": model.get_output_embeddings().weight.numel(), "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, "dtype": str(dtype)}
    save_model_dir(model, path, tok)
    del model
    release()
    return info


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ one stage
def run_stage(out: Path, name: str, kwargs: dict, *, devices: str | None, pipeline: str, stage: str = "train_student"):
    from distill_bench.stages import run_named_stage

    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices   # the meter measures the job's GPUs, as under SLURM
    t0 = time.time()
    try:
        summary = run_named_stage(stage, out_json=out / f"{name}.stage.json",
                                  meter_args={"stage_id": f"bench.multi.{name}", "pipeline": pipeline,
                                              "energy": ENERGY}, kwargs=kwargs)
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
    return summary, json.loads((out / f"{name}.stage.json").read_text()), time.time() - t0


def flops_per_input_token(info: dict, examples: list[dict], trained_per_input: float) -> float:
    lengths = [len(e["input_ids"]) for e in examples]
    mean_sq_over_mean = sum(n * n for n in lengths) / sum(lengths)
    body = info["matmul_parameters"] - info["head_parameters"]
    return 6 * body + 6 * info["head_parameters"] * trained_per_input + 12 * info["layers"] * info["hidden"] * \
        mean_sq_over_mean


def row_from(name: str, rec: dict, summary: dict, wall: float, info: dict, examples: list[dict] | None,
             peak_tflops: float, world: int) -> dict:
    speed = rec["metrics"].get("speed") or summary.get("speed") or {}
    e = rec["energy"]
    row = {"run": name, "status": rec["status"], "stage_duration_s": rec["duration_s"], "wall_s": wall,
           "trained_tokens": rec["tokens"]["counts"].get("trained_tokens"),
           "input_tokens": rec["tokens"]["counts"].get("input_tokens"),
           "gpu_j": e.get("gpu_j"), "per_device_j": e.get("per_device_j"), "total_j": e.get("total_j"),
           "speed": speed, "steps": summary.get("steps"), "loss_curve": summary.get("loss_curve"),
           "resolved": {k: rec["metrics"].get(k) for k in ("attn_implementation", "padding_free", "torch_compile")},
           "distributed": rec["metrics"].get("distributed"), "model": info, "world_size": world}
    tps = speed.get("input_tokens_per_s")
    if tps and examples:
        ratio = (speed.get("trained_tokens_per_s") or 0) / tps
        row["mfu"] = tps * flops_per_input_token(info, examples, ratio) / (world * peak_tflops * 1e12)
    if row["gpu_j"] and row["trained_tokens"]:
        row["stage_j_per_trained_token"] = row["gpu_j"] / row["trained_tokens"]
    return row


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, gloo processes on CPU")
    ap.add_argument("--runs", default="sft,kd,dpo,losscheck")
    ap.add_argument("--shape", default="olmo2-7b", choices=sorted(SHAPES))
    ap.add_argument("--dpo-shape", default="olmo2-1b", choices=sorted(SHAPES))
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--distributed", default="fsdp", choices=("fsdp", "ddp"))
    ap.add_argument("--per-gpu-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per sft/kd run")
    ap.add_argument("--lengths", default="256,1024", help="example length range in tokens (lo,hi)")
    ap.add_argument("--torch-compile", default="auto", help="training.torch_compile for the sft/kd/dpo runs")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="training.gradient_checkpointing for the sft/kd runs (a 13B student's activations)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip a run expected to end past this")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = a.quick
    cuda = torch.cuda.is_available()
    if not quick and torch.cuda.device_count() < a.gpus:
        raise SystemExit(f"--gpus {a.gpus}: only {torch.cuda.device_count()} CUDA devices visible")
    runs = [r for r in a.runs.split(",") if r]
    unknown = sorted(set(runs) - set(EXPECTED_S))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {sorted(EXPECTED_S)}")
    lo, hi = (8, 40) if quick else tuple(int(x) for x in a.lengths.split(","))
    max_length = 64 if quick else hi + 64
    shape = SHAPES["tiny" if quick else a.shape]
    per_gpu = 2 if quick else a.per_gpu_batch
    steps = 3 if quick else a.steps
    world = a.gpus
    precision = "bf16" if cuda else "fp32"
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() and not quick else None
    work = Path(tempfile.mkdtemp(prefix="bench_multi_", dir=shm))
    log(f"work {work}; {torch.cuda.device_count()} GPUs; runs {runs}")
    peak, _ = gpu_suite.matmul_peak_tflops(quick)
    release()
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "matmul_peak_tflops_gpu0": peak, "gpus": world, "distributed": a.distributed, "runs": []}
    tok = make_tokenizer(work)
    data = make_sft_dataset(work / "data", max(64, per_gpu * world * steps * 2), lo, hi)
    examples = encoded(tok, data, max_length)
    log(f"dataset: {len(examples)} examples, mean {sum(len(e['input_ids']) for e in examples) / len(examples):.0f} "
        f"tokens")
    base = dict(max_length=max_length, grad_accum=1, lr=1e-5, warmup_ratio=0.0, lr_scheduler="constant",
                precision=precision, save_steps=10 ** 6, logging_steps=1, torch_compile=a.torch_compile,
                gradient_checkpointing=a.gradient_checkpointing)
    student: dict | None = None

    def need_student() -> dict:
        nonlocal student
        if student is None:
            t = time.time()
            student = save_random_model(shape, work / "student", tok)
            log(f"student {a.shape if not quick else 'tiny'}: {student['parameters'] / 1e9:.2f} B parameters, saved "
                f"in {time.time() - t:.1f}s")
        return student

    def record(row: dict) -> None:
        result["runs"].append(row)
        write_json(out / "multi_gpu.json", result)
        log(f"{row['run']}: " + json.dumps({k: row.get(k) for k in ("status", "mfu", "stage_duration_s", "gpu_j",
                                                                    "error", "skipped")}, default=str)
            + " speed " + json.dumps(row.get("speed"), default=str)[:400])

    devices = ",".join(str(i) for i in range(world)) if cuda else None
    compile_mode = a.torch_compile
    for run in runs:
        expected = EXPECTED_S[run] * (SIZE_FACTOR.get(a.shape, 1.0) if run in ("sft", "kd") else 1.0)
        if not quick and left(a.budget_s) < expected:
            record({"run": run, "skipped": f"{left(a.budget_s):.0f}s left, expects ~{expected:.0f}s"})
            continue
        log(f"run {run}")
        try:
            if run in ("sft", "kd"):
                info = need_student()
                budget = budget_for_steps(examples, steps * per_gpu * world, seed=0)
                kw = dict(pipeline="sft_gt", dataset=str(data), tokenizer=str(work / "tok"),
                          init_model=str(work / "student"), out_dir=str(work / f"out_{run}"), seed=0,
                          training={**base, "token_budget": budget, "batch_size": per_gpu, "gpus": world,
                                    "distributed": a.distributed, "torch_compile": compile_mode})
                if run == "kd":
                    kd = {"top_k": 8 if quick else 100, "value_dtype": "float16", "temperature": 1.0, "alpha": 0.5,
                          "batch_size": 16}
                    teacher_cfg = shape if quick else {**OLMO2_1B, "vocab_size": shape["vocab_size"]}
                    save_random_model(teacher_cfg, work / "teacher", tok, torch.bfloat16 if cuda else torch.float32)
                    _, crec, cwall = run_stage(out, "kd_cache", dict(
                        teacher=str(work / "teacher"), tokenizer=str(work / "tok"), dataset=str(data),
                        out_dir=str(work / "cache"), kd=kd, training=kw["training"], seed=0),
                        devices="0" if cuda else None, pipeline="kd", stage="cache_logits")
                    result["kd_cache"] = {"duration_s": crec["duration_s"], "gpu_j": crec["energy"].get("gpu_j"),
                                          "tokens": crec["tokens"]["counts"], "wall_s": cwall}
                    kw.update(pipeline="kd", kd_cache=str(work / "cache"), kd=kd)
                try:
                    summary, rec, wall = run_stage(out, run, kw, devices=devices, pipeline=kw["pipeline"])
                except Exception:
                    if compile_mode != "none":   # the next large run trains eagerly, so one number still comes back
                        log(f"{run} failed with torch_compile {compile_mode}: later sft/kd runs use none")
                        compile_mode = "none"
                    raise
                row = row_from(run, rec, summary, wall, info, examples, peak, world)
                row["torch_compile_setting"] = kw["training"]["torch_compile"]
                record(row)
            elif run == "dpo":
                dshape = SHAPES["tiny" if quick else a.dpo_shape]
                info = save_random_model(dshape, work / "dpo_init", tok)
                words = max(3, (lo + hi) // 8)
                n_pairs = per_gpu * world * (3 if quick else 12)
                pairs = make_pairs(work / "pairs", n_pairs, words)
                kw = dict(pipeline="dpo", dataset=str(pairs), tokenizer=str(work / "tok"),
                          init_model=str(work / "dpo_init"), out_dir=str(work / "out_dpo"), seed=0,
                          training={**base, "token_budget": 1, "batch_size": per_gpu, "gpus": world,
                                    "distributed": a.distributed},
                          dpo={"beta": 0.1, "epochs": 1, "max_length": max_length})
                summary, rec, wall = run_stage(out, "dpo", kw, devices=devices, pipeline="dpo")
                record(row_from("dpo", rec, summary, wall, info, None, peak, world))
            elif run == "losscheck":
                cfg = TINY if quick else SMALL_LLAMA
                info = save_random_model(cfg, work / "small", tok)
                small_steps = 4 if quick else 30
                budget = budget_for_steps(examples, small_steps * per_gpu * world, seed=0)
                curves = {}
                for gpus in (1, world):
                    kw = dict(pipeline="sft_gt", dataset=str(data), tokenizer=str(work / "tok"),
                              init_model=str(work / "small"), out_dir=str(work / f"out_small{gpus}"), seed=0,
                              training={**base, "lr": 1e-4, "token_budget": budget, "torch_compile": "none",
                                        "batch_size": per_gpu * world // gpus, "gpus": gpus,
                                        "distributed": a.distributed})
                    summary, rec, wall = run_stage(out, f"losscheck_gpus{gpus}", kw, pipeline="sft_gt",
                                                   devices=(",".join(str(i) for i in range(gpus)) if cuda else None))
                    curves[gpus] = [loss for _, loss in summary["loss_curve"]]
                    record(row_from(f"losscheck_gpus{gpus}", rec, summary, wall, info, examples, peak, gpus))
                rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(curves[1], curves[world])]
                result["losscheck"] = {"steps": len(rel), "max_rel_diff": max(rel) if rel else None,
                                       "mean_rel_diff": sum(rel) / len(rel) if rel else None,
                                       "loss_1gpu": curves[1], f"loss_{world}gpu": curves[world]}
                write_json(out / "multi_gpu.json", result)
        except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
            traceback.print_exc()
            record({"run": run, "error": repr(e)[:600]})
        for done in (f"out_{run}", "cache", "out_small1", f"out_small{world}", "out_dpo", "dpo_init", "small"):
            shutil.rmtree(work / done, ignore_errors=True)   # a 7B/13B student's saves must not fill /dev/shm
        release()
    shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"\n{result['device']} x {result['gpus']} ({result['distributed']}), matmul peak "
          f"{result['matmul_peak_tflops_gpu0']:.0f} TFLOP/s per GPU")
    print("run | status | params (B) | steady tok/s (input) | MFU | peak GiB (max rank) | stage s | GPU J per device "
          "| wrapper")
    print("---|---|---|---|---|---|---|---|---")
    for r in result["runs"]:
        if "skipped" in r or "error" in r:
            print(f"{r['run']} | {r.get('skipped') or r.get('error')} |||||||")
            continue
        s = r.get("speed") or {}
        tps, mfu = s.get("input_tokens_per_s"), r.get("mfu")
        dev = ", ".join(f"{k} {v:,.0f}" for k, v in (r.get("per_device_j") or {}).items()) or "-"
        print(f"{r['run']} | {r['status']} | {r['model']['parameters'] / 1e9:.2f} | "
              f"{f'{tps:,.0f}' if tps else '-'} | {f'{100 * mfu:.1f} %' if mfu else '-'} | "
              f"{s.get('peak_memory_gib_max_rank') or '-'} | {r['stage_duration_s']:.1f} | {dev} | {s.get('wrapper')}")
    lc = result.get("losscheck")
    if lc:
        print(f"losscheck: {lc['steps']} steps, max / mean relative loss difference 1 vs {result['gpus']} GPUs "
              f"{lc['max_rel_diff']:.2e} / {lc['mean_rel_diff']:.2e}")


if __name__ == "__main__":
    sys.exit(main())
