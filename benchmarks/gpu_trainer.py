"""Real trainer path on one GPU (issue 10): `train_student` (TRL SFTTrainer subclass, exact counting, our collators)
for sft_gt and kd (real top-k cache built by `build_cache`), eager vs `training.torch_compile`, padding vs
`training.padding_free`, DataLoader workers. One entry point, JSON under --out, one table printed last.

    python benchmarks/gpu_trainer.py --out DIR            # OLMo-2-0425-1B shape, random init, needs a CUDA GPU
    python benchmarks/gpu_trainer.py --out DIR --quick    # tiny shapes on CPU (checks every code path)

Data: random token sequences, lengths uniform in [256, 2048], completion = second half, in our `examples` format
(input_ids, completion_mask, example_index). Every variant starts from the same random init and trains the first
`steps` micro-batches of the same budgeted stream. Steady state = optimizer steps after `warmup` (CUDA-synchronised
clock at both ends). Tokens/s counts real (non-pad) input tokens. MFU uses useful FLOPs only:
6 * N_body * tokens + 6 * N_head * loss positions + 12 * L * d * sum(seq_len^2) (attention per real sequence, no
causal halving), over the bf16 matmul peak measured in the same process; `mfu_suite` is gpu_suite.py's formula
(6 * N incl. head on every token + 12*L*d*S) for comparison with the tight loop. Every variant runs inside
`distill_bench.energy.StageMeter` (codecarbon off); steady-state GPU energy is read from the NVML counter.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
from gpu_suite import OLMO2_1B, TINY, dev, make_model, matmul_params, sync  # noqa: E402

ENERGY = {"codecarbon": False, "sample_interval_s": 0.1}
T0 = time.monotonic()
RESULTS: dict[str, object] = {}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def save(out: Path, name: str, payload) -> None:
    RESULTS[name] = payload
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out / f"{name}.json")


# ------------------------------------------------------------------------------------------------ data
def make_examples(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random ids, length ~ U[lo, hi], completion = second half (position 0 never a target)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(4, vocab) for _ in range(length)]   # 0-3: the tiny tokenizer's specials
        half = length // 2
        out.append({"input_ids": ids, "completion_mask": [0] * half + [1] * (length - half), "example_index": i})
    return out


def tiny_tokenizer(tmp: Path):
    from distill_bench.models.tokenizer import train_tokenizer

    texts = [f"question {i} plus {i * 7} equals {i * 8}" for i in range(50)]
    return train_tokenizer(texts, vocab_size=200, out_dir=tmp / "tokenizer")


def budget_for(examples: list[dict], n_examples: int, seed: int) -> tuple[int, list[dict]]:
    """Token budget whose stream is exactly the first ``n_examples`` of the seed's shuffle (whole examples)."""
    from distill_bench.train.budget import build_budgeted_dataset, trained_positions

    total = sum(trained_positions(e["completion_mask"]) for e in examples)
    epochs = -(-n_examples // len(examples))   # later epochs reshuffle; the prefix of the stream never changes
    full, _ = build_budgeted_dataset(examples, total * epochs, seed)
    if n_examples > len(full):
        raise ValueError(f"need {n_examples} examples, the dataset has {len(full)}: raise --examples")
    stream = full[:n_examples]
    return sum(trained_positions(e["completion_mask"]) for e in stream), stream


# ------------------------------------------------------------------------------------------------ packing check
def padding_free_check(attn: str, device: torch.device) -> dict:
    """A padding-free (flattened, position_ids) batch must give the padded batch's per-token log-probs.

    Tiny OLMo-2 in fp32; TRL's own collator both ways, every collator key passed to the model as the trainer does.
    Negative control: the same flattened row with position_ids 0..T-1 (documents attend across boundaries) must
    differ, or the check could not fail.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cfg = dict(TINY, vocab_size=512)
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(**cfg, attn_implementation=attn)).to(device).eval()
    exs = make_examples(4, 9, 40, 512, seed=3)
    feats = [{"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]} for e in exs]

    def logprobs(batch: dict) -> torch.Tensor:
        labels = batch.pop("labels")
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()
                 if k != "completion_mask"}
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt = labels[:, 1:].to(device)
        m = tgt != -100
        return lp[m].gather(1, tgt[m][:, None]).squeeze(1).cpu()

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # tf32 alone is ~1e-4
    try:
        return _compare(model, feats, logprobs, attn, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _compare(model, feats, logprobs, attn, device) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padded = logprobs(DataCollatorForLanguageModeling(pad_token_id=0)(feats))
    packed_batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(feats)
    keys = sorted(packed_batch)
    packed = logprobs(dict(packed_batch))
    cross = dict(packed_batch)
    cross["position_ids"] = torch.arange(cross["position_ids"].shape[1])[None]
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):
        cross.pop(k, None)
    crossed = logprobs(cross)
    diff = (padded - packed).abs().max().item() if padded.shape == packed.shape else float("inf")
    ctrl = (padded - crossed).abs().max().item() if padded.shape == crossed.shape else float("inf")
    tol = 1e-4
    return {"attn": attn, "device": str(device), "positions": int(padded.numel()), "max_abs_diff": diff,
            "cross_document_control_diff": ctrl, "tolerance": tol, "collator_keys": keys,
            "correct": bool(diff <= tol and ctrl > 100 * tol)}


# ------------------------------------------------------------------------------------------------ one variant
def nvml_energy_mj() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
    except Exception:  # noqa: BLE001 - optional
        return None


def clock_callback(warmup: int, max_wall_s: float | None):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Synchronised wall clock + NVML energy at the end of step ``warmup`` and of the last step; stops training
        early (last step = the one past ``max_wall_s``, at least warmup + 5) so one slow variant cannot eat the call."""

        def __init__(self):
            self.marks: dict[int, tuple[float, int | None]] = {}
            self.step_ends: list[float] = []
            self.start = None
            self.last_step = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.step_ends.append(now)
            g = state.global_step
            if g % 10 == 0 or g <= 3:
                log(f"  step {g}/{state.max_steps} at {now - self.start:.1f}s")
            late = max_wall_s is not None and now - self.start > max_wall_s and g >= warmup + 5
            if g in (warmup, state.max_steps) or late:
                sync()
                self.marks[g] = (time.perf_counter(), nvml_energy_mj())
                self.last_step = g
            if late and g < state.max_steps:
                log(f"  stopping at step {g}: past {max_wall_s:.0f}s")
                control.should_training_stop = True
            return control

    return Clock()


def window_stats(stream: list[dict], batch: int, first_step: int, last_step: int, model) -> dict:
    """Exact token and FLOP counts of steps (first_step, last_step] from the stream (sequential sampler)."""
    items = stream[first_step * batch:last_step * batch]
    c = model.config
    head = model.get_output_embeddings().weight.numel()
    body = matmul_params(model) - head
    real = sum(len(e["input_ids"]) for e in items)
    loss_pos = sum(sum(e["completion_mask"][1:]) for e in items)
    sq = sum(len(e["input_ids"]) ** 2 for e in items)
    padded = 0
    for s in range(0, len(items), batch):
        b = items[s:s + batch]
        padded += len(b) * max(len(e["input_ids"]) for e in b)
    attn = 12 * c.num_hidden_layers * c.hidden_size * sq
    useful = 6 * body * real + 6 * head * loss_pos + attn
    # gpu_suite.py convention: 6N (head on every token) + attention at the padded width S
    suite = 0
    for s in range(0, len(items), batch):
        b = items[s:s + batch]
        w = max(len(e["input_ids"]) for e in b)
        suite += sum(len(e["input_ids"]) for e in b) * (6 * (body + head) + 12 * c.num_hidden_layers
                                                         * c.hidden_size * w)
    return {"real_tokens": real, "padded_tokens": padded, "loss_positions": loss_pos, "useful_flops": useful,
            "suite_flops": suite, "examples": len(items)}


def run_variant(name: str, *, out: Path, work: Path, cfg: dict, tok, examples: list[dict], batch: int, steps: int,
                warmup: int, seed: int, peak_tflops: float, training: dict, kd_cache: Path | None = None,
                kd: dict | None = None, attn: str = "sdpa", kd_full_head: bool = False,
                trainer_cls=None, max_wall_s: float | None = None) -> dict:
    from distill_bench.energy import StageMeter
    from distill_bench.train.trainer import TrainSettings, train_student

    cuda = torch.cuda.is_available()
    budget, stream = budget_for(examples, steps * batch, seed)
    settings = TrainSettings.from_dict(dict(
        token_budget=budget, max_length=max(len(e["input_ids"]) for e in examples), batch_size=batch, lr=1e-4,
        warmup_ratio=0.0, precision="bf16" if cuda else "fp32", save_steps=10 ** 6, **training))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = make_model(cfg, torch.float32, attn)
    model.train()
    collator = None
    info: dict = {}
    if kd_cache is not None:
        from distill_bench.kd.trainer import kd_trainer_parts

        trainer_cls, collator, info = kd_trainer_parts(str(kd_cache), kd or {}, tok, examples)
        if kd_full_head:   # the old path: [B, L, V] logits of every position
            trainer_cls = type(trainer_cls.__name__, (trainer_cls,), {"kd_head_on_loss_positions": False})
    clock = clock_callback(warmup, max_wall_s)
    run_dir = work / name
    meter = StageMeter(stage="benchmark", stage_id=f"bench.trainer.{name}", role="student",
                       out_json=out / "energy" / f"{name}.json", settings=ENERGY, is_measuring_process=True,
                       install_signal_handlers=False)
    meter.start()
    t0 = time.perf_counter()
    status = "failed"
    summary: dict = {}
    try:
        summary = train_student(model=model, tokenizer=tok, examples=examples, settings=settings, seed=seed,
                                output_dir=run_dir, trainer_cls=trainer_cls, collator=collator, meter=meter,
                                trainer_kwargs={"callbacks": [clock]}, fingerprint_extra={"bench": name})
        status = "complete"
    except RuntimeError as e:   # stopped early by the clock: the budget check refuses; the window is still valid
        if clock.last_step is None or clock.last_step >= steps or "budget" not in str(e):
            raise
        status = "interrupted"
    finally:
        rec = meter.stop(status) or {}
        shutil.rmtree(run_dir, ignore_errors=True)
    total_s = time.perf_counter() - t0
    last = clock.last_step
    (ta, ea), (tb, eb) = clock.marks[warmup], clock.marks[last]
    w = window_stats(stream, batch, warmup, last, model)
    dt = tb - ta
    e = rec.get("energy", {})
    win_j = (eb - ea) / 1e3 if ea is not None and eb is not None else None
    res = {
        "variant": name, "kind": "kd" if kd_cache else "sft_gt", "attn": attn, "training": training,
        "batch": batch, "steps": last, "planned_steps": steps, "warmup_steps": warmup, "window_s": dt,
        "tokens_per_s": w["real_tokens"] / dt, "loss_tokens_per_s": w["loss_positions"] / dt,
        "padded_tokens_per_s": w["padded_tokens"] / dt,
        "pad_fraction": 0.0 if training.get("padding_free") else 1 - w["real_tokens"] / w["padded_tokens"],
        "step_s": dt / (last - warmup), "mfu": w["useful_flops"] / dt / (peak_tflops * 1e12),
        "mfu_suite": w["suite_flops"] / dt / (peak_tflops * 1e12), "window": w,
        "warmup_s": ta - clock.start, "train_call_s": total_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "window_gpu_j": win_j, "j_per_token": win_j / w["real_tokens"] if win_j else None,
        "stage_gpu_j": e.get("gpu_j"), "stage_wall_s": rec.get("duration_s"),
        "trained_tokens": summary.get("trained_tokens"), "input_tokens": summary.get("input_tokens"),
        "token_budget": budget, "final_loss": summary.get("final_loss"), "status": status,
        "data_wait_fraction": summary.get("data_wait_fraction"),
        "train_runtime_s": summary.get("train_runtime_s"),
        "kd_info": {k: v for k, v in info.items() if k in ("kd_cache_k", "kd_top_k", "kd_value_dtype")} or None,
    }
    if status == "complete" and summary["trained_tokens"] != budget:
        raise RuntimeError(f"{name}: trained {summary['trained_tokens']} != budget {budget}")
    del model
    release()
    return res


def release() -> None:
    """Free the previous variant's model, optimizer and compiled graphs before the next one."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_ce_trainer_cls():
    """Diagnostic SFT trainer: torch CE over head(hidden) at loss positions only (distill_bench.kd.trainer.add_kd_head)
    instead of TRL 1.16's fused chunked log-prob kernel (which also computes entropy and top-1 every step)."""
    import torch.nn.functional as F
    from trl import SFTTrainer

    from distill_bench.kd.trainer import add_kd_head

    class PlainCESFTTrainer(SFTTrainer):
        loss_is_scaled_for_ga = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not add_kd_head(self.model):
                raise RuntimeError("model logits are not head(hidden)")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            mask = labels[:, 1:] != -100
            rows, cols = mask.nonzero(as_tuple=True)
            z = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), kd_rows=rows,
                      kd_cols=cols)
            loss = F.cross_entropy(z.float(), labels[:, 1:][mask], reduction="sum")
            return loss / (num_items_in_batch if num_items_in_batch is not None else mask.sum())

    return PlainCESFTTrainer


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip variants that would end past this wall time")
    ap.add_argument("--variants", default="", help="comma list to run (default: all, in order)")
    ap.add_argument("--timed-s", type=float, default=20.0, help="target steady-state seconds per variant")
    ap.add_argument("--max-wall-s", type=float, default=110.0, help="stop a variant's training past this (s)")
    ap.add_argument("--checks", default="sdpa,flex_attention", help="attention kernels for the padding-free check")
    a = ap.parse_args()
    out = Path(a.out)
    (out / "energy").mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    quick = a.quick
    d = dev()
    cfg = TINY if quick else OLMO2_1B
    lo, hi = (16, 64) if quick else (256, 2048)
    n_ex = 64 if quick else 512
    batch = 4
    seed = 1234
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() and not quick else None
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_", dir=shm))
    log(f"device {d}, work dir {work}")

    ceil = gpu_suite.ceilings(out, quick)
    peak = ceil["matmul_bf16_tflops"]
    save(out, "ceilings", ceil)

    checks = {}
    for attn in a.checks.split(","):
        try:
            checks[attn] = padding_free_check(attn, d)
        except Exception as e:  # noqa: BLE001 - an unsupported kernel is a finding, not a crash
            checks[attn] = {"attn": attn, "error": repr(e)[:400], "correct": False}
        log(f"padding-free check {attn}: {checks[attn]}")
    save(out, "padding_free_check", checks)

    tok = tiny_tokenizer(work)
    examples = make_examples(n_ex, lo, hi, cfg["vocab_size"])
    log(f"{n_ex} examples, {sum(len(e['input_ids']) for e in examples)} tokens")

    # KD cache: a random teacher of the student's shape, bf16 on GPU, built by the real cache builder
    from distill_bench.kd.stage import build_cache
    from distill_bench.models.tokenizer import vocab_hash

    cache = work / "kd_cache"
    k = 8 if quick else 64
    teacher = make_model(cfg, torch.bfloat16 if d.type == "cuda" else torch.float32)
    with gpu_suite.Metered(out, "kd_cache") as m:
        tc = time.perf_counter()
        manifest, stats = build_cache(teacher, examples, cache, k=k, value_dtype="bfloat16", temperatures=[1.0],
                                      batch_size=16, pad_token_id=int(tok.pad_token_id),
                                      meta={"teacher": "random-olmo2", "tokenizer": "tiny",
                                            "tokenizer_vocab_hash": vocab_hash(tok), "max_length": hi})
        sync()
        cache_s = time.perf_counter() - tc
    del teacher
    if d.type == "cuda":
        torch.cuda.empty_cache()
    save(out, "kd_cache", {"seconds": cache_s, "input_tokens_per_s": stats["input_tokens"] / cache_s, **stats,
                           "bytes_per_position": manifest["bytes_per_position"], "gpu_j": m.gpu_j})
    log(f"kd cache: {stats['cached_positions']} positions in {cache_s:.1f}s")
    kd = {"top_k": k, "value_dtype": "bfloat16", "alpha": 0.5, "temperature": 1.0}

    # steps: eager ~0.2 s/step, compiled ~0.13 s/step on an H100 at batch 4 x ~1.1k tokens (gpu_suite numbers)
    def steps_for(step_s: float, warm: int) -> tuple[int, int]:
        if quick:
            return warm + 3, warm
        return warm + max(20, int(a.timed_s / step_s)), warm

    pf_ok = checks.get("sdpa", {}).get("correct", False)
    flex_ok = checks.get("flex_attention", {}).get("correct", False)
    pf = {"padding_free": True}
    comp = {"torch_compile": True}
    plan = [  # name, kd?, training overrides, attn, est step s, warm-up steps, est fixed cost s, kd full head, run?
        ("sft_pad_eager", False, {}, "sdpa", 0.36, 5, 15, False, True),
        ("sft_pad_eager_plaince", False, {}, "sdpa", 0.24, 5, 15, False, True),
        ("kd_pad_eager", True, {}, "sdpa", 0.22, 5, 15, False, True),
        ("sft_padfree_sdpa_eager", False, pf, "sdpa", 0.20, 5, 15, False, pf_ok),
        ("kd_pad_eager_fullhead", True, {}, "sdpa", 0.24, 5, 15, True, True),
        ("sft_pad_compile", False, comp, "sdpa", 0.14, 12, 90, False, True),
        ("kd_pad_compile", True, comp, "sdpa", 0.16, 12, 90, False, True),
        ("sft_padfree_flex_eager", False, pf, "flex_attention", 0.18, 8, 40, False, flex_ok),
        ("kd_pad_eager_workers2", True, {"dataloader_workers": 2}, "sdpa", 0.22, 5, 15, False, True),
        ("sft_padfree_sdpa_compile", False, {**pf, **comp}, "sdpa", 0.14, 12, 90, False, pf_ok),
    ]
    plan = [p[:-1] for p in plan if p[-1]]
    want = set(filter(None, a.variants.split(",")))
    runs = []
    for name, is_kd, training, attn, step_s, warm, fixed, full_head in plan:
        if want and name not in want:
            continue
        if quick and training.get("dataloader_workers"):
            training = {}   # CPU runs force workers to 0 (training_arguments); the path is the same
        steps, warm = steps_for(step_s, warm)
        need = fixed + steps * step_s * 1.3
        if not quick and left(a.budget_s) < need:
            log(f"skip {name}: needs ~{need:.0f}s, {left(a.budget_s):.0f}s left")
            runs.append({"variant": name, "skipped": f"budget ({left(a.budget_s):.0f}s left, needs ~{need:.0f}s)"})
            continue
        log(f"run {name}: {steps} steps ({warm} warm-up)")
        try:
            r = run_variant(name, out=out, work=work, cfg=cfg, tok=tok, examples=examples, batch=batch, steps=steps,
                            warmup=warm, seed=seed, peak_tflops=peak, training=training,
                            kd_cache=cache if is_kd else None, kd=kd, attn=attn, kd_full_head=full_head,
                            trainer_cls=plain_ce_trainer_cls() if name.endswith("_plaince") else None,
                            max_wall_s=None if quick else a.max_wall_s)
        except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
            traceback.print_exc()
            r = {"variant": name, "error": repr(e)[:400]}
            release()
        runs.append(r)
        log(f"{name}: " + json.dumps({k: r.get(k) for k in ("tokens_per_s", "mfu", "step_s", "peak_mem_gib",
                                                            "data_wait_fraction", "warmup_s", "error")},
                                     default=str))
        save(out, "trainer_runs", {"model": "tiny" if quick else "OLMo-2-0425-1B shape, random init",
                                   "device": ceil["device"], "torch": torch.__version__, "runs": runs})
    shutil.rmtree(work, ignore_errors=True)
    table(out, runs)


def table(out: Path, runs: list[dict]) -> None:
    ok = {r["variant"]: r for r in runs if "tokens_per_s" in r}
    head = ("variant", "tok/s", "MFU", "MFU(suite)", "step s", "pad %", "GiB", "J/tok", "wait %", "warm-up s",
            "vs target")
    rows = []
    for r in runs:
        if "tokens_per_s" not in r:
            rows.append((r["variant"], r.get("error", r.get("skipped", "?"))[:80]) + ("",) * (len(head) - 2))
            continue
        note = f"MFU/45% = {r['mfu'] / 0.45:.2f}"
        if r["kind"] == "kd":
            ref = ok.get(r["variant"].replace("kd_", "sft_").replace("_workers2", "").replace("_fullhead", ""))
            alt = ok.get(r["variant"].replace("kd_", "sft_").replace("_fullhead", "").replace("_workers2", "")
                         + "_plaince")
            if alt:
                note += f"; {100 * (1 - r['tokens_per_s'] / alt['tokens_per_s']):+.1f}% vs {alt['variant']}"
            if ref:
                note += f"; {100 * (1 - r['tokens_per_s'] / ref['tokens_per_s']):+.1f}% slower than {ref['variant']}"
        rows.append((r["variant"], f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                     f"{100 * r['mfu_suite']:.1f}%", f"{r['step_s']:.3f}", f"{100 * r['pad_fraction']:.0f}",
                     f"{r['peak_mem_gib'] or 0:.1f}", f"{r['j_per_token']:.4f}" if r.get("j_per_token") else "-",
                     f"{100 * r['data_wait_fraction']:.1f}" if r.get("data_wait_fraction") is not None else "-",
                     f"{r['warmup_s']:.1f}", note))
    w = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    lines = [" | ".join(str(h).ljust(w[i]) for i, h in enumerate(head))]
    lines += [" | ".join(str(x).ljust(w[i]) for i, x in enumerate(row)) for row in rows]
    text = "\n".join(lines)
    (out / "table.txt").write_text(text + "\n")
    save(out, "summary", {"results": dict(RESULTS), "wall_s": time.monotonic() - T0})
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
