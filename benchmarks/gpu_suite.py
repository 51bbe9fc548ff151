"""GPU benchmark suite (issue 10): ceilings, student training MFU, teacher generation vs roofline, logit caching,
energy-meter overhead. One entry point, JSON per section under --out, one table printed last.

    python benchmarks/gpu_suite.py --out DIR            # real shapes (OLMo-2-0425-1B config), needs a CUDA GPU
    python benchmarks/gpu_suite.py --out DIR --quick    # tiny shapes, runs on CPU (checks the code paths only)

Models are random-initialised from the config (no weights needed for speed or energy). Timings use CUDA events
after warm-up; every timed region is also wrapped in distill_bench.energy.StageMeter (codecarbon off).
Training is timed as the trainer's step in a tight loop (same model, autocast-bf16 over fp32 master weights like
HF Trainer ``bf16=True``, fused AdamW, loss = HF causal-LM CE or distill_bench.kd.loss.kd_loss): HF Trainer's own
per-step overhead is outside it. The real trainer path is exercised by benchmarks/gpu_ddp.py.
FLOPs/token (PaLM, appendix B): 6*N + 12*L*d_model*S, N = parameters in matmuls (all but the input embedding),
L layers, S sequence length (attention scores and values, no causal halving).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OLMO2_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                intermediate_size=8192, vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
OLMO2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
# the study's largest student (OLMo-2-1124-13B)
OLMO2_13B = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                 intermediate_size=13824, vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
# the study's teacher (OLMo-2-0325-32B): grouped-query attention, 8 K/V heads; 64 GB of bf16 weights, built in the
# run's dtype directly (in fp32 first it would need 128 GB of the card)
OLMO2_32B = dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                 intermediate_size=27648, vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, build_in_dtype=True)
# Llama 3 shapes: grouped-query attention (8 K/V heads), so a decode step reads 4x less KV cache than OLMo-2's
LLAMA32_1B = dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                  max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA31_8B = dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                  max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPES = {"olmo2-1b": OLMO2_1B, "olmo2-7b": OLMO2_7B, "olmo2-32b": OLMO2_32B, "llama3.2-1b": LLAMA32_1B,
          "llama3.1-8b": LLAMA31_8B}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=1000, max_position_embeddings=512, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False)
ENERGY = {"codecarbon": False, "sample_interval_s": 0.1}

RESULTS: dict[str, dict] = {}
ROWS: list[tuple[str, str, str, str]] = []   # (measure, variant, result, vs target)
T0 = time.monotonic()


def dev() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# caching-allocator counters (torch.cuda.memory_stats): device mallocs/frees, and retries (a failed malloc makes the
# allocator free its cached blocks, synchronising the device, and try again)
ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_counters() -> dict:
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """CUDA events on GPU, perf_counter on CPU; seconds."""

    def __enter__(self):
        sync()
        if torch.cuda.is_available():
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.b.record()
            self.b.synchronize()
            self.s = self.a.elapsed_time(self.b) / 1e3
        else:
            self.s = time.perf_counter() - self.t


class Metered:
    """StageMeter around a region; .gpu_j and .j afterwards (None where no GPU counter)."""

    def __init__(self, out: Path, name: str, role: str = "student"):
        from distill_bench.energy import StageMeter

        self.m = StageMeter(stage="benchmark", stage_id=f"bench.{name}", role=role, out_json=out / "energy"
                            / f"{name}.json", settings=ENERGY, is_measuring_process=True,
                            install_signal_handlers=False)

    def __enter__(self):
        self.m.start()
        return self

    def __exit__(self, exc_type, *exc):
        rec = self.m.stop("complete" if exc_type is None else "failed") or {}
        e = rec.get("energy", {})
        self.gpu_j = e.get("gpu_j") if e.get("sources", {}).get("gpu", "unavailable") != "unavailable" else None
        self.per_device = e.get("per_device_j")
        self.avg_w = rec.get("power", {}).get("gpu_avg_w")
        return False


def save(out: Path, section: str, payload: dict) -> None:
    RESULTS[section] = payload
    (out / f"{section}.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"[{time.monotonic() - T0:6.1f}s] {section}: {json.dumps(payload, default=str)[:1500]}", flush=True)


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


# ------------------------------------------------------------------------------------------------ ceilings
def matmul_peak_tflops(quick: bool) -> tuple[float, int]:
    """Measured bf16 matmul ceiling (n^3, 20 reps after 3 warm-up): (TFLOP/s, n)."""
    d = dev()
    n = 512 if quick else 8192
    dt = torch.bfloat16 if d.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=d, dtype=dt), torch.randn(n, n, device=d, dtype=dt)
    for _ in range(3):
        a @ b
    reps = 3 if quick else 20
    with Timer() as t:
        for _ in range(reps):
            a @ b
    return 2 * n ** 3 * reps / t.s / 1e12, n


def hbm_copy_tb_s(quick: bool) -> tuple[float, int]:
    """Measured HBM bandwidth: a 4 GiB device copy, bytes read + written per second: (TB/s, bytes copied)."""
    nbytes = (1 << 24) if quick else (4 << 30)
    x = torch.empty(nbytes // 2, device=dev(), dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    reps = 3 if quick else 10
    with Timer() as t:
        for _ in range(reps):
            y.copy_(x)
    return 2 * nbytes * reps / t.s / 1e12, nbytes


def ceilings(out: Path, quick: bool) -> dict:
    d = dev()
    tflops, n = matmul_peak_tflops(quick)
    bw, nbytes = hbm_copy_tb_s(quick)
    info = {"matmul_bf16_tflops": tflops, "matmul_n": n, "copy_tb_s_read_plus_write": bw, "copy_bytes": nbytes,
            "device": torch.cuda.get_device_name() if d.type == "cuda" else "cpu",
            "torch": torch.__version__}
    save(out, "ceilings", info)
    ROWS.append(("peak", f"bf16 matmul {n}^3", f"{tflops:.0f} TFLOP/s", "ceiling"))
    ROWS.append(("peak", "HBM copy (r+w)", f"{bw:.2f} TB/s", "ceiling"))
    return info


# ------------------------------------------------------------------------------------------------ models
def make_model(cfg: dict, dtype: torch.dtype, attn: str = "sdpa"):
    """Random-initialised model of a real shape (``arch``: olmo2, the default, or llama), built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

    cfg = dict(cfg)
    config_cls, model_cls = {"olmo2": (Olmo2Config, Olmo2ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[cfg.pop("arch", "olmo2")]
    in_dtype = cfg.pop("build_in_dtype", False)
    config = config_cls(**cfg, attn_implementation=attn)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    if in_dtype:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(dev()):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype)


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding (a row gather), and the
    LM head even when it is tied to the embedding."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings().weight is emb
    return total if tied else total - emb.numel() * emb.element_size()


def matmul_params(model) -> int:
    """Parameters used in matmuls: all but the input embedding (a row gather); the LM head counted, tied or not."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total if model.get_output_embeddings().weight is emb else total - emb.numel()


def flops_per_token(model, seq: int) -> float:
    c = model.config
    return 6 * matmul_params(model) + 12 * c.num_hidden_layers * c.hidden_size * seq


def synthetic_teacher(n: int, k: int, vocab: int, device) -> tuple[torch.Tensor, ...]:
    """Cache rows of the right shape: sorted top-k log-probs of a random distribution, its ids and tail."""
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(n, 4 * k, generator=g) * 3
    lp = torch.log_softmax(logits, dim=-1)
    vals, _ = lp.topk(k, dim=-1)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(min(n, 64))])
    ids = ids.repeat((n + ids.shape[0] - 1) // ids.shape[0], 1)[:n]
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-6))
    pin = device.type == "cuda"
    return tuple(t.contiguous().pin_memory() if pin else t.contiguous() for t in (ids, vals, tail))


def train_variant(model, name: str, *, out: Path, batch: int, seq: int, steps: int, warmup: int, loss: str,
                  autocast: bool, peak_tflops: float, kd_impl=None, chunk: int | None = None,
                  compiled=None) -> dict:
    from distill_bench.kd.loss import kd_loss

    d = dev()
    kd_fn = kd_impl or kd_loss
    vocab = model.config.vocab_size
    fwd = compiled or model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=d.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(d)
    labels = ids.clone()
    labels[:, 0] = -100
    n_pos = batch * (seq - 1)
    t_ids, t_vals, t_tail = synthetic_teacher(n_pos, 64, vocab, d)
    amp = torch.autocast(d.type, dtype=torch.bfloat16, enabled=autocast)

    def step():
        with amp:
            if loss == "ce":
                out_ = fwd(input_ids=ids, labels=labels, use_cache=False)
                lval = out_.loss
            else:
                logits = fwd(input_ids=ids, use_cache=False).logits
                lval, _ = kd_fn(logits, labels, t_ids.to(d, non_blocking=True), t_vals.to(d, non_blocking=True),
                                t_tail.to(d, non_blocking=True), alpha=0.5, temperature=1.0,
                                num_items_in_batch=n_pos, chunk_size=chunk)
        lval.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return lval

    if d.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tc = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - tc
    with Metered(out, f"train_{name}") as m, Timer() as t:
        for _ in range(steps):
            lval = step()
    tokens = batch * seq * steps
    tps = tokens / t.s
    fpt = flops_per_token(model, seq)
    mfu = fpt * tps / (peak_tflops * 1e12)
    res = {"variant": name, "loss": loss, "batch": batch, "seq": seq, "steps": steps, "time_s": t.s,
           "tokens_per_s": tps, "flops_per_token": fpt, "mfu_vs_measured_peak": mfu,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if d.type == "cuda" else None,
           "warmup_s": warm_s, "final_loss": float(lval), "gpu_j": m.gpu_j,
           "j_per_token": m.gpu_j / tokens if m.gpu_j else None, "gpu_avg_w": m.avg_w, "kd_chunk": chunk,
           "autocast_bf16_fp32_master": autocast}
    return res


def training(out: Path, quick: bool, peak: float, budget: float) -> None:
    cfg = TINY if quick else OLMO2_1B
    seq = 64 if quick else 2048
    batch = 2 if quick else 4
    steps, warmup = (2, 1) if quick else (6, 3)
    model = make_model(cfg, torch.float32)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    import gpu_kd_loss_v0

    runs = []
    plan = [
        ("sft_ce", dict(loss="ce", autocast=True)),
        ("kd_v0_chunk_default", dict(loss="kd", autocast=True, kd_impl=gpu_kd_loss_v0.kd_loss)),
        ("kd_chunk_default", dict(loss="kd", autocast=True)),
        ("kd_chunk_2048", dict(loss="kd", autocast=True, chunk=2048 if not quick else 16)),
        ("kd_chunk_8192", dict(loss="kd", autocast=True, chunk=8192 if not quick else 64)),
    ]
    for name, kw in plan:
        if left(budget) < 60:
            print(f"skip {name}: budget", flush=True)
            continue
        try:
            r = train_variant(model, name, out=out, batch=batch, seq=seq, steps=steps, warmup=warmup,
                              peak_tflops=peak, **kw)
        except torch.OutOfMemoryError as e:
            r = {"variant": name, "error": f"OOM: {str(e)[:200]}"}
        runs.append(r)
        save(out, "training", {"model": "OLMo-2-1B shape" if not quick else "tiny", "params": n_params,
                               "matmul_params": matmul_params(model), "runs": runs})
    # sequence 4096 (same tokens per step)
    if left(budget) > 90:
        r = train_variant(model, "sft_ce_seq4096", out=out, batch=max(1, batch // 2), seq=seq * 2, steps=steps,
                          warmup=warmup, peak_tflops=peak, loss="ce", autocast=True)
        runs.append(r)
        best_kd = min((x for x in runs if x.get("loss") == "kd" and "tokens_per_s" in x),
                      key=lambda x: -x["tokens_per_s"], default=None)
        if best_kd:
            r = train_variant(model, "kd_seq4096", out=out, batch=max(1, batch // 2), seq=seq * 2, steps=steps,
                              warmup=warmup, peak_tflops=peak, loss="kd", autocast=True, chunk=best_kd["kd_chunk"])
            runs.append(r)
    # torch.compile of the model (compile time reported separately)
    if left(budget) > 150:
        tc = time.perf_counter()
        try:
            for layer in model.model.layers:   # regional compilation: one graph per decoder layer, reused
                layer.compile()
            compiled = model
            r = train_variant(model, "sft_ce_compiled", out=out, batch=batch, seq=seq, steps=steps, warmup=warmup,
                              peak_tflops=peak, loss="ce", autocast=True, compiled=compiled)
            r["compile_plus_warmup_s"] = time.perf_counter() - tc - r["time_s"]
        except Exception as e:  # noqa: BLE001 - report, keep the suite going
            r = {"variant": "sft_ce_compiled", "error": repr(e)[:300]}
        runs.append(r)
    save(out, "training", {"model": "OLMo-2-1B shape" if not quick else "tiny", "params": n_params,
                           "matmul_params": matmul_params(model), "runs": runs})
    sft = next((x for x in runs if x["variant"] == "sft_ce" and "tokens_per_s" in x), None)
    for r in runs:
        if "error" in r:
            ROWS.append(("train", r["variant"], r["error"][:40], "-"))
            continue
        extra = ""
        if r["loss"] == "kd" and sft and r["seq"] == sft["seq"]:
            extra = f"; {100 * (1 - r['tokens_per_s'] / sft['tokens_per_s']):+.1f}% slower than SFT (target <=10%)"
        ROWS.append(("train 1B", r["variant"], f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu_vs_measured_peak']:.1f}%, "
                     f"{r['peak_mem_gib'] or 0:.1f} GiB", f"MFU/45% = {r['mfu_vs_measured_peak'] / 0.45:.2f}{extra}"))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ generation
def gen_run(model, prompts: list[list[int]], *, batch: int, padding: str, sort: bool, new: int, out: Path,
            name: str, pad_id: int, static: bool = False) -> dict:
    from transformers import GenerationConfig

    d = dev()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) if sort else list(range(len(prompts)))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    if static:
        kw.update(cache_implementation="static")
    gc = GenerationConfig(**kw)
    gen_tokens = padded_prompt = 0
    with Metered(out, f"gen_{name}") as m, Timer() as t:
        for s in range(0, len(order), batch):
            rows = [prompts[i] for i in order[s:s + batch]]
            w = max(len(r) for r in rows)
            ids = torch.full((len(rows), w), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                sl = slice(w - len(r), w) if padding == "left" else slice(0, len(r))
                ids[j, sl] = torch.tensor(r)
                mask[j, sl] = 1
            padded_prompt += ids.numel() - sum(len(r) for r in rows)
            with torch.no_grad():
                o = model.generate(input_ids=ids.to(d), attention_mask=mask.to(d), generation_config=gc)
            gen_tokens += (o.shape[1] - w) * len(rows)   # min_new_tokens: every row generates exactly `new`
    tps = gen_tokens / t.s
    return {"variant": name, "batch": batch, "padding": padding, "sorted": sort, "prompts": len(prompts),
            "new_tokens": new, "generated_tokens": gen_tokens, "time_s": t.s, "tokens_per_s": tps,
            "padded_prompt_tokens": padded_prompt, "gpu_j": m.gpu_j,
            "j_per_token": m.gpu_j / gen_tokens if m.gpu_j else None, "gpu_avg_w": m.avg_w, "static_cache": static}


def generation(out: Path, quick: bool, bw_tb_s: float, budget: float, cfg=None, label="1B") -> None:
    cfg = cfg or (TINY if quick else OLMO2_1B)
    dt = torch.bfloat16 if dev().type == "cuda" else torch.float32
    model = make_model(cfg, dt).eval()
    weight_bytes = decode_weight_bytes(model)
    g = torch.Generator().manual_seed(0)
    vocab = cfg["vocab_size"]
    new = 16 if quick else 128

    def prompts(n):
        lens = torch.randint(32 if not quick else 4, 512 if not quick else 24, (n,), generator=g).tolist()
        return [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lens]

    gen_run(model, prompts(4), batch=4, padding="left", sort=True, new=8, out=out, name=f"warmup_{label}", pad_id=0)
    runs = []
    plan = [(f"orig_b4_right_{label}", dict(batch=4, padding="right", sort=False), 16 if not quick else 8),
            (f"ours_b64_left_sorted_{label}", dict(batch=64, padding="left", sort=True), 64),
            (f"ours_b256_left_sorted_{label}", dict(batch=256, padding="left", sort=True), 256)]
    for name, kw, n in plan:
        if left(budget) < 45:
            continue
        r = gen_run(model, prompts(n), out=out, name=name, pad_id=0, new=new, **kw)
        r["roofline_tokens_per_s"] = r["batch"] * bw_tb_s * 1e12 / weight_bytes
        r["fraction_of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
        runs.append(r)
        save(out, f"generation_{label}", {"weight_bytes_read_per_step": weight_bytes, "runs": runs})
    if not quick and left(budget) > 200 and label == "1B":
        try:
            p = prompts(64)
            tc = time.perf_counter()
            gen_run(model, p[:64], batch=64, padding="left", sort=True, new=8, out=out, name="static_warm",
                    pad_id=0, static=True)
            warm = time.perf_counter() - tc
            r = gen_run(model, p, batch=64, padding="left", sort=True, new=new, out=out,
                        name=f"ours_b64_static_compiled_{label}", pad_id=0, static=True)
            r["compile_warmup_s"] = warm
            r["roofline_tokens_per_s"] = 64 * bw_tb_s * 1e12 / weight_bytes
            r["fraction_of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
        except Exception as e:  # noqa: BLE001
            r = {"variant": f"ours_b64_static_compiled_{label}", "error": repr(e)[:300]}
        runs.append(r)
        save(out, f"generation_{label}", {"weight_bytes_read_per_step": weight_bytes, "runs": runs})
    for r in runs:
        if "error" in r:
            ROWS.append((f"gen {label}", r["variant"], r["error"][:40], "-"))
            continue
        ROWS.append((f"gen {label}", r["variant"], f"{r['tokens_per_s']:,.0f} tok/s, "
                     f"{r['j_per_token'] or float('nan'):.3f} J/tok", f"{100 * r['fraction_of_roofline']:.1f}% of "
                     f"roofline {r['roofline_tokens_per_s']:,.0f} (target 50%)"))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ logit cache
STUDY_CACHE_BYTES_PER_POSITION = 1600   # the study's cache, about 1.6 KB per position (docs/KD.md)
CACHE_TARGET = 0.90                      # cache build at >= 90 % of a bare teacher forward's throughput


def cache_corpus(vocab: int, quick: bool) -> list[dict]:
    """Seeded prompt + completion records, 512-1024 tokens (the completion two thirds of each)."""
    g = torch.Generator().manual_seed(0)
    n, length_max = (16, 48) if quick else (256, 1024)
    enc = []
    for _ in range(n):
        length = int(torch.randint(length_max // 2, length_max + 1, (1,), generator=g))
        p = length // 3
        enc.append({"input_ids": torch.randint(1, vocab, (length,), generator=g).tolist(),
                    "completion_mask": [0] * p + [1] * (length - p)})
    return enc


def bare_forward(model, enc: list[dict], batch_size: int) -> int:
    """The cache's batches (same order, same padding) through the teacher and its LM head on the loss positions,
    and nothing else: no softmax, top-k, copy to the host or write. Returns the input tokens."""
    import distill_bench.kd.stage as kdstage

    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]), reverse=True)
    head_only = kdstage.head_is_plain(model)
    chunk = max(1, kdstage.CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])
    tokens = 0
    for s in range(0, len(order), batch_size):
        batch = [enc[i] for i in order[s:s + batch_size]]
        source, n, _ = kdstage._loss_position_logits(model, batch, pad_token_id=0, device=dev(),
                                                     head_only=head_only)
        for c in range(0, n, chunk):
            source(c, min(n, c + chunk))
        tokens += sum(len(e["input_ids"]) for e in batch)
    return tokens


def caching(out: Path, quick: bool, budget: float, shape: str = "olmo2-1b", k: int = 64,
            batch_size: int = 16) -> None:
    """Cache build against a bare forward of the same batches, interleaved bare, cache, cache, bare."""
    import distill_bench.kd.stage as kdstage

    cfg = TINY if quick else SHAPES[shape]
    dt = torch.bfloat16 if dev().type == "cuda" else torch.float32
    model = make_model(cfg, dt).eval()
    enc = cache_corpus(cfg["vocab_size"], quick)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        kdstage.build_cache(model, enc[:batch_size], Path(tmp) / "warm", k=k, value_dtype="bfloat16",
                            temperatures=[1.0], batch_size=batch_size, pad_token_id=0)
        bare_forward(model, enc[:batch_size], batch_size)
        for i, kind in enumerate(("bare", "cache", "cache", "bare")):
            if runs and left(budget) < 2.5 * max(r["time_s"] for r in runs):
                print(f"skip cache {kind} {i}: budget", flush=True)
                continue
            with Metered(out, f"cache_{shape}_{kind}_{i}") as m, Timer() as t:
                if kind == "bare":
                    tokens, positions, manifest = bare_forward(model, enc, batch_size), None, {}
                else:
                    manifest, stats = kdstage.build_cache(model, enc, Path(tmp) / f"c{i}", k=k,
                                                          value_dtype="bfloat16", temperatures=[1.0],
                                                          batch_size=batch_size, pad_token_id=0)
                    tokens, positions = stats["input_tokens"], stats["cached_positions"]
            runs.append({"kind": kind, "order": i, "time_s": t.s, "input_tokens": tokens, "positions": positions,
                         "input_tokens_per_s": tokens / t.s, "bytes_per_position": manifest.get("bytes_per_position"),
                         "gpu_j": m.gpu_j, "gpu_avg_w": m.avg_w,
                         "j_per_input_token": m.gpu_j / tokens if m.gpu_j else None,
                         "j_per_cached_position": m.gpu_j / positions if m.gpu_j and positions else None})
            save(out, f"caching_{shape}", {"shape": shape, "k": k, "value_dtype": "bfloat16",
                                           "batch_size": batch_size, "runs": runs, **cache_summary(runs)})
    summary = cache_summary(runs)
    if summary.get("fraction_of_bare") is not None:
        ROWS.append((f"cache {shape} k={k}", "vs bare forward",
                     f"{summary['cache_tokens_per_s']:,.0f} vs {summary['bare_tokens_per_s']:,.0f} in-tok/s, "
                     f"{summary['bytes_per_position']} B/pos, {summary['j_per_cached_position'] or float('nan'):.3f}"
                     f" J/pos", f"{100 * summary['fraction_of_bare']:.1f}% of bare (target "
                     f"{100 * CACHE_TARGET:.0f}%)"))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cache_summary(runs: list[dict]) -> dict:
    """Mean throughput of each kind, the cache's fraction of the bare forward, its bytes and joules per position."""
    def mean(kind, key):
        vals = [r[key] for r in runs if r["kind"] == kind and r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    def rate(kind):   # all of a kind's tokens over all of its time
        of = [r for r in runs if r["kind"] == kind]
        return sum(r["input_tokens"] for r in of) / sum(r["time_s"] for r in of) if of else None

    bare, cache = rate("bare"), rate("cache")
    built = [r for r in runs if r["kind"] == "cache"]
    return {"bare_tokens_per_s": bare, "cache_tokens_per_s": cache,
            "fraction_of_bare": cache / bare if bare and cache else None, "target": CACHE_TARGET,
            "bytes_per_position": built[0]["bytes_per_position"] if built else None,
            "study_bytes_per_position": STUDY_CACHE_BYTES_PER_POSITION,
            "j_per_cached_position": mean("cache", "j_per_cached_position"),
            "j_per_input_token_cache": mean("cache", "j_per_input_token"),
            "j_per_input_token_bare": mean("bare", "j_per_input_token")}


# ------------------------------------------------------------------------------------------------ meter overhead
def meter_overhead(out: Path, quick: bool) -> None:
    d = dev()
    n = 256 if quick else 8192
    dt = torch.bfloat16 if d.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=d, dtype=dt), torch.randn(n, n, device=d, dtype=dt)
    reps = 20 if quick else 2000   # ~2.8 s at ~780 TFLOP/s

    def work():
        with Timer() as t:
            for _ in range(reps):
                a @ b
        return t.s

    work()
    times = {"off": [], "on": []}
    for i in range(3):
        times["off"].append(work())
        with Metered(out, f"meter_overhead_{i}"):
            times["on"].append(work())
    off, on = sorted(times["off"])[1], sorted(times["on"])[1]
    spread = (max(times["off"]) - min(times["off"])) / off
    res = {"off_s": times["off"], "on_s": times["on"], "median_off_s": off, "median_on_s": on,
           "overhead": (on - off) / off, "spread_off": spread, "sample_interval_s": ENERGY["sample_interval_s"]}
    save(out, "meter_overhead", res)
    ROWS.append(("meter overhead", "100 ms sampling", f"{100 * res['overhead']:+.2f}% (off spread "
                 f"{100 * spread:.2f}%)", "target <0.5%"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU")
    ap.add_argument("--sections", default="ceilings,training,generation,caching,meter,generation7b")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip optional runs past this wall time")
    ap.add_argument("--cache-shape", default="olmo2-1b", choices=sorted(SHAPES), help="teacher shape of 'caching'")
    ap.add_argument("--cache-k", type=int, default=64, help="top-k of 'caching'")
    ap.add_argument("--cache-batch", type=int, default=16, help="sequences per teacher forward in 'caching'")
    a = ap.parse_args()
    out = Path(a.out)
    (out / "energy").mkdir(parents=True, exist_ok=True)
    want = set(a.sections.split(","))
    torch.backends.cuda.matmul.allow_tf32 = True
    c = ceilings(out, a.quick)
    steps = [("training", lambda: training(out, a.quick, c["matmul_bf16_tflops"], a.budget_s)),
             ("generation", lambda: generation(out, a.quick, c["copy_tb_s_read_plus_write"] / 2, a.budget_s)),
             ("caching", lambda: caching(out, a.quick, a.budget_s, a.cache_shape, a.cache_k, a.cache_batch)),
             ("meter", lambda: meter_overhead(out, a.quick)),
             ("generation7b", lambda: generation(out, a.quick, c["copy_tb_s_read_plus_write"] / 2, a.budget_s,
                                                 cfg=TINY if a.quick else OLMO2_7B, label="7B"))]
    for name, fn in steps:
        if name not in want:
            continue
        if name == "generation7b" and left(a.budget_s) < 100:
            print("skip generation7b: budget", flush=True)
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            import traceback

            traceback.print_exc()
            ROWS.append((name, "error", repr(e)[:60], "-"))
    (out / "summary.json").write_text(json.dumps({"rows": ROWS, "results": RESULTS,
                                                  "wall_s": time.monotonic() - T0}, indent=2, default=str))
    w = [max(len(r[i]) for r in ROWS + [("measure", "variant", "result", "vs target")]) for i in range(4)]
    print("\n" + " | ".join(h.ljust(w[i]) for i, h in enumerate(("measure", "variant", "result", "vs target"))))
    for r in ROWS:
        print(" | ".join(x.ljust(w[i]) for i, x in enumerate(r)))


if __name__ == "__main__":
    main()
