"""Real trainer path on one GPU (issue 10): `train_student` (TRL SFTTrainer subclass, exact counting, our collators)
for sft_gt and kd (real top-k cache built by `build_cache`): padded vs `training.padding_free`, free lengths vs
`training.pad_to_multiple_of`, eager vs `training.torch_compile` (layers / model), SDPA vs flex vs varlen attention,
DataLoader workers. Variant names spell their settings (sft_padfree_layers_m64 = padding-free, layer compile,
lengths x64); `*_gpu_defaults` leave every speed key at `auto`, as a user's run resolves them, and
`sft_gpu_defaults_syncs` puts the old per-step host synchronisations back for comparison, `*_foreach` swaps the
fused AdamW step for foreach AdamW (`training.optim: adamw_torch`), `*_fusedclip` folds the gradient clip into fused
AdamW (`training.optim: adamw_fused_clip`), `*_compiledclip` uses the same update compiled by Inductor
(`training.optim: adamw_compiled_clip`; what `optim: auto` resolves to in a study-length run, while a benchmark
run is too short to repay its compile, so `*_gpu_defaults` here train with HF's AdamW). `--batch` sets the rows
per micro-batch (4 by default, as in every table of docs/BENCHMARKS.md unless it says otherwise).
One entry point, JSON under --out, one table printed last.

    python benchmarks/gpu_trainer.py --out DIR            # OLMo-2-0425-1B shape, random init, needs a CUDA GPU
    python benchmarks/gpu_trainer.py --out DIR --quick    # tiny shapes on CPU (checks every code path)
    python benchmarks/gpu_trainer.py --out DIR --fresh-shapes --examples 1024 --warmup-steps 60 \
        --variants sft_padfree_eager,sft_padfree_layers_m64,kd_padfree_layers_m64   # as in docs/BENCHMARKS.md

A step at batch shapes the process has not met before costs more (benchmarks/gpu_shapes.py), so runs that share a
data order flatter the later ones: ``--fresh-shapes`` gives each run its own order, ``--repeats 2`` interleaves
(ABBA), ``--profile VARIANT[,VARIANT]`` adds one untimed run each with torch.profiler over 3 steps (kernel time by kind).

Data: random token sequences, lengths uniform in [256, 2048], completion = second half, in our `examples` format
(input_ids, completion_mask, example_index). Every variant starts from the same random init and trains the first
`steps` micro-batches of the budgeted stream (the same stream unless --fresh-shapes). Steady state = optimizer steps after `warmup` (CUDA-synchronised
clock at both ends). Tokens/s counts real (non-pad) input tokens. MFU uses useful FLOPs only:
6 * N_body * tokens + 6 * N_head * loss positions + 12 * L * d * sum(seq_len^2) (attention per real sequence, no
causal halving), over the bf16 matmul peak measured in the same process; `mfu_suite` is gpu_suite.py's formula
(6 * N incl. head on every token + 12*L*d*S) for comparison with the tight loop. Every variant runs inside
`distill_bench.energy.StageMeter` (codecarbon off); steady-state GPU energy is read from the NVML counter.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import offline_env  # noqa: E402, F401  (sets the offline environment before transformers loads)

import torch  # noqa: E402

import gpu_suite  # noqa: E402
from gpu_suite import OLMO2_1B, TINY, allocator_counters, dev, make_model, matmul_params, sync  # noqa: E402

ENERGY = {"codecarbon": False, "sample_interval_s": 0.1}
T0 = time.monotonic()
RESULTS: dict[str, object] = {}
THROWAWAY_RUN, PROFILE_RUN = -1, -2   # "repeat" of runs that are not throughput samples


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
    differ, or the check could not fail. ``varlen`` (training.attn_implementation: varlen, flash kernel, CUDA,
    16-bit only): bf16 model, the padded reference through SDPA, the control as one document (cu_seq_lens [0, T]).
    """
    cfg = dict(TINY, vocab_size=512)
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from distill_bench.train import varlen

    is_varlen = attn == varlen.CONFIG_NAME
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(**cfg, attn_implementation="sdpa" if is_varlen else attn)).to(device).eval()
    if is_varlen:
        model = model.to(torch.bfloat16)
    exs = make_examples(4, 9, 40, 512, seed=3)
    feats = [{"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]} for e in exs]

    def logprobs(batch: dict) -> torch.Tensor:
        labels = batch.pop("labels")
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()
                 if k != "completion_mask"}
        if is_varlen:   # padded batches through SDPA, flattened rows through the varlen kernel
            model.set_attn_implementation(varlen.register() if "cu_seq_lens_q" in batch else "sdpa")
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt = labels[:, 1:].to(device)
        m = tgt != -100
        return lp[m].gather(1, tgt[m][:, None]).squeeze(1).cpu()

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # tf32 alone is ~1e-4
    try:
        return _compare(model, feats, logprobs, attn, device, tol=3e-2 if is_varlen else 1e-4,
                        one_document_control=is_varlen)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _compare(model, feats, logprobs, attn, device, *, tol: float, one_document_control: bool) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padded = logprobs(DataCollatorForLanguageModeling(pad_token_id=0)(feats))
    packed_batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(feats)
    keys = sorted(packed_batch)
    packed = logprobs(dict(packed_batch))
    cross = dict(packed_batch)
    n = cross["position_ids"].shape[1]
    cross["position_ids"] = torch.arange(n)[None]
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):
        cross.pop(k, None)
    if one_document_control:
        cross.update(cu_seq_lens_q=torch.tensor([0, n], dtype=torch.int32), max_length_q=n)
    crossed = logprobs(cross)
    diff = (padded - packed).abs().max().item() if padded.shape == packed.shape else float("inf")
    ctrl = (padded - crossed).abs().max().item() if padded.shape == crossed.shape else float("inf")
    return {"attn": attn, "device": str(device), "positions": int(padded.numel()), "max_abs_diff": diff,
            "cross_document_control_diff": ctrl, "tolerance": tol, "collator_keys": keys,
            "correct": bool(diff <= tol and ctrl > 10 * tol)}


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
            self.allocator: dict[int, dict] = {}   # caching-allocator counters at the marks (gpu_suite)
            self.graphs: dict[int, int] = {}       # graphs compiled so far, at the marks
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
                self.allocator[g] = allocator_counters()
                self.graphs[g] = graphs_compiled()
                self.last_step = g
            if late and g < state.max_steps:
                log(f"  stopping at step {g}: past {max_wall_s:.0f}s")
                control.should_training_stop = True
            return control

    return Clock()


KERNEL_KINDS = (  # first match wins; lower-case substrings of CUDA kernel names
    ("attention", ("fmha", "flash", "attention", "efficient_attention", "cutlass_sdpa")),
    ("gemm", ("gemm", "cutlass", "nvjet", "cublas", "xmma", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
    ("compiled (triton)", ("triton",)),   # before copy: a fused kernel's name lists its ops (e.g. _to_copy)
    ("copy/fill", ("copy", "memcpy", "memset", "fill", "cat_")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other eager (elementwise, norm, reduction)"


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far: a difference over a window counts its (re)compilations."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profiler_callback(first_step: int, n_steps: int, out_dir: Path, name: str):
    """torch.profiler over optimizer steps (first_step, first_step + n_steps]: GPU busy share of the wall clock,
    kernel time by kind, the GPU's idle gaps with what the host ran during them, and every host synchronisation
    (torch's sync debug mode, with the Python stack that asked for it). Measured, not guessed: what limits the step."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Prof(TrainerCallback):
        def __init__(self):
            self.prof = None
            self.t = 0.0
            self.graphs = 0
            self.syncs = SyncRecorder()

        def on_step_end(self, args, state, control, **kw):
            g = state.global_step
            if g == first_step:
                sync()
                self.prof = profile(activities=[ProfilerActivity.CPU]
                                    + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
                self.prof.__enter__()
                self.t = time.perf_counter()
                self.graphs = graphs_compiled()
                self.syncs.start()
            elif self.prof is not None and g == first_step + n_steps:
                self.syncs.stop()
                sync()
                wall = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)
                summarise_profile(self.prof, wall, n_steps, out_dir, name,
                                  graphs_compiled_in_window=graphs_compiled() - self.graphs,
                                  host_syncs=self.syncs.summary())
                self.prof = None
            return control

    return Prof()


class SyncRecorder:
    """Host synchronisations between start() and stop(): torch.cuda's sync debug mode warns at each one (a blocking
    copy, .item(), a data-dependent shape); the Python stack at the warning says who asked. No-op without CUDA."""

    FRAMES = 6   # innermost frames kept per stack, outside warnings/torch internals

    def __init__(self):
        self.stacks: dict[tuple[str, ...], int] = {}
        self._ctx = None

    def start(self) -> None:
        if not torch.cuda.is_available():
            return
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "called a synchronizing" not in str(message):   # not torch's notice that the mode is a prototype
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/warnings.py" not in f.filename and f.filename != __file__]
        key = (str(message).split("\n")[0][:80],) + tuple(
            f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
            for f in frames[-self.FRAMES:])
        self.stacks[key] = self.stacks.get(key, 0) + 1

    def stop(self) -> None:
        if self._ctx is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._ctx.__exit__(None, None, None)
        self._ctx = None

    def summary(self) -> list[dict]:
        return [{"count": n, "what": k[0], "stack": list(k[1:])}
                for k, n in sorted(self.stacks.items(), key=lambda kv: -kv[1])]


def idle_gaps(kernels: list[tuple], host_ops: list[tuple[str, str, float, float, int | None]],
              min_gap_us: float = 20.0, top: int = 20) -> dict:
    """The GPU's idle time between its first and last kernel, and what the host executed during it.

    ``kernels``: (start, end[, name]) in µs of every device activity (kernels, copies, fills); with names, the idle
    time is also totalled by the pair of activities around each gap (the one that ended last before it, the one
    after it): which kernels the GPU waits between. ``host_ops``: (thread label,
    name, start, end, index of the parent op or None), on the profiler's clock. A host op's share is its *self* time
    inside the gaps (its children's time is theirs); time inside a gap that no op of a thread covers is that thread's
    untraced Python. Gaps shorter than ``min_gap_us`` are launch latency, not idleness, and are left out."""
    import bisect

    busy: list[list] = []   # [start, end, name of the activity that started it, name of the one that ends last]
    for k in sorted(kernels):
        a, b, name = k[0], k[1], (k[2] if len(k) > 2 else "")
        if busy and a <= busy[-1][1]:
            if b > busy[-1][1]:
                busy[-1][1], busy[-1][3] = b, name
        else:
            busy.append([a, b, name, name])
    gaps: list[tuple[float, float]] = []
    around: dict[tuple[str, str], float] = {}
    for before, after in zip(busy, busy[1:]):
        if after[0] - before[1] >= min_gap_us:
            gaps.append((before[1], after[0]))
            key = (before[3][:80], after[2][:80])
            around[key] = around.get(key, 0.0) + after[0] - before[1]
    ends = [g[1] for g in gaps]

    def inside(a: float, b: float) -> float:
        total, i = 0.0, bisect.bisect_right(ends, a)
        while i < len(gaps) and gaps[i][0] < b:
            total += max(0.0, min(b, gaps[i][1]) - max(a, gaps[i][0]))
            i += 1
        return total

    idle = sum(b - a for a, b in gaps)
    overlap = [inside(a, b) for _, _, a, b, _ in host_ops]
    self_us = list(overlap)
    covered: dict[str, float] = {}
    for i, (thread, _, _, _, parent) in enumerate(host_ops):
        if parent is None:
            covered[thread] = covered.get(thread, 0.0) + overlap[i]
        else:
            self_us[parent] -= overlap[i]
    by_op: dict[tuple[str, str], float] = {}
    for (thread, op, _, _, _), us in zip(host_ops, self_us):
        if us > 0:
            by_op[(thread, op)] = by_op.get((thread, op), 0.0) + us
    for thread, us in covered.items():
        if idle - us > 0:
            by_op[(thread, "(no traced op: Python between ops)")] = idle - us
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"gpu_span_us": busy[-1][1] - busy[0][0] if busy else 0.0, "idle_us": idle, "gaps": len(gaps),
            "largest_gaps_us": sorted((round(b - a, 1) for a, b in gaps), reverse=True)[:10],
            "min_gap_us": min_gap_us,
            "host_self_us_in_gaps": [{"thread": t, "op": op[:120], "us": round(us, 1)} for (t, op), us in ranked],
            "idle_us_between": [{"after": a, "before": b, "us": round(us, 1)}
                                for (a, b), us in sorted(around.items(), key=lambda kv: -kv[1])[:top]
                                if a or b]}


def is_annotation(event, name: str) -> bool:
    """A user annotation on the device timeline (e.g. "Optimizer.step#AdamW.step"): a range over kernels that are
    listed on their own, so not a kernel to count. Kernel names hold a '#' too when they are C++ templates over
    lambdas ("...{lambda()#1}..."), but always with brackets; an annotation's name has none."""
    if getattr(event, "is_user_annotation", False):
        return True
    return "#" in name and not any(c in name for c in "<({")


def profile_gaps(prof, min_gap_us: float = 20.0) -> dict:
    """``idle_gaps`` over a torch.profiler run: device events against host ops, threads labelled main (the one that
    ran the optimizer step) and other (autograd's device thread launches the backward)."""
    events = list(prof.events())
    device = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
              and not is_annotation(e, e.name)]
    host = [e for e in events if str(getattr(e, "device_type", "")).endswith("CPU")]
    main_thread = next((e.thread for e in host if e.name.startswith("Optimizer.step")), None)
    index = {id(e): i for i, e in enumerate(host)}
    ops = [("main" if e.thread == main_thread else f"thread {e.thread}", e.name, e.time_range.start,
            e.time_range.end, index.get(id(e.cpu_parent)) if e.cpu_parent is not None else None) for e in host]
    return idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in device], ops, min_gap_us)


def device_kernels(prof) -> list[tuple[str, int, float]]:
    """(name, calls, device µs) of every GPU kernel in a profile, annotations left out."""
    return [(evt.key, evt.count, float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total",
                                                                                       0.0))))
            for evt in prof.key_averages()
            if str(getattr(evt, "device_type", "")).endswith("CUDA") and not is_annotation(evt, evt.key)]


def summarise_profile(prof, wall_s: float, n_steps: int, out_dir: Path, name: str,
                      graphs_compiled_in_window: int = 0, host_syncs: list[dict] | None = None) -> dict:
    """Kernel time by kind over the profiled steps; ``graphs_compiled_in_window`` > 0 marks a profile whose steps
    include a (re)compilation, so its shares describe compilation as much as training."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, float] = {}
    kernels = []
    for key, calls, us in device_kernels(prof):
        kinds[kernel_kind(key)] = kinds.get(kernel_kind(key), 0.0) + us
        kernels.append((us, calls, key[:120]))
    busy_us = sum(kinds.values())
    kernels.sort(reverse=True)
    res = {"variant": name, "steps": n_steps, "wall_s": wall_s, "step_s": wall_s / n_steps,
           "graphs_compiled_in_window": graphs_compiled_in_window,
           "gpu_kernel_s": busy_us / 1e6, "gpu_busy_fraction": busy_us / 1e6 / wall_s,
           "kernel_s_by_kind": {k: v / 1e6 for k, v in sorted(kinds.items(), key=lambda x: -x[1])},
           "share_of_wall_by_kind": {k: v / 1e6 / wall_s for k, v in sorted(kinds.items(), key=lambda x: -x[1])},
           "top_kernels": [{"s": us / 1e6, "calls": c, "name": k} for us, c, k in kernels[:30]],
           "host_syncs": host_syncs or []}
    try:
        res["idle"] = profile_gaps(prof)
    except Exception as e:  # noqa: BLE001 - the kernel table above is the result; the gap analysis is extra
        res["idle"] = {"error": repr(e)[:300]}
    (out_dir / f"{name}_profile.json").write_text(json.dumps(res, indent=2))
    for sort in ("self_cuda_time_total", "self_cpu_time_total"):
        try:
            (out_dir / f"{name}_{sort}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        except Exception as e:  # noqa: BLE001 - the JSON above is the result; the tables are extra
            log(f"profile table {sort}: {e!r}")
    if graphs_compiled_in_window:
        log(f"profile {name}: {graphs_compiled_in_window} graph(s) compiled inside the profiled steps: this profile "
            "describes compilation too (raise --profile-warmup)")
    log(f"profile {name}: busy {100 * res['gpu_busy_fraction']:.1f}% of {wall_s:.2f}s; "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in res["share_of_wall_by_kind"].items()))
    idle = res["idle"]
    if "idle_us" in idle:
        hosts = ", ".join(f"{h['thread']} {h['op'][:60]} {h['us'] / 1e3 / n_steps:.2f}"
                          for h in idle["host_self_us_in_gaps"][:8])
        log(f"profile {name}: GPU idle {idle['idle_us'] / 1e3 / n_steps:.1f} ms per step in {idle['gaps']} gaps; "
            f"host during them (ms per step): {hosts}")
        log(f"profile {name}: idle ms per step between device activities: " + "; ".join(
            f"{g['after'][:50]} -> {g['before'][:50]} {g['us'] / 1e3 / n_steps:.2f}" for g in idle["idle_us_between"][:6]))
    for h in res["host_syncs"]:
        log(f"profile {name}: {h['count']} host sync(s): {h['what']} at " + " <- ".join(reversed(h["stack"][-3:])))
    return res


def window_stats(stream: list[dict], batch: int, first_step: int, last_step: int, model, accum: int = 1) -> dict:
    """Exact token and FLOP counts of optimizer steps (first_step, last_step] from the stream (sequential sampler);
    a step is ``accum`` micro-batches of ``batch`` rows."""
    items = stream[first_step * batch * accum:last_step * batch * accum]
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


def positionless_collator(pad_token_id: int):
    """An LMCollator without its CPU-built loss positions and count: the trainer then finds them on the GPU."""
    from distill_bench.train.collate import LOSS_POSITIONS, LOSS_TOKENS, LMCollator

    class PositionlessCollator(LMCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            for k in (*LOSS_POSITIONS, LOSS_TOKENS):
                batch.pop(k)
            return batch

    return PositionlessCollator(pad_token_id)


@contextlib.contextmanager
def host_syncs_as_before(active: bool):
    """HF's per-step NaN/inf filter on and blocking batch copies, as the trainer ran before (for the comparison)."""
    import distill_bench.train.trainer as trainer_mod

    if not active:
        yield
        return
    original = trainer_mod.training_arguments

    def with_syncs(*args, **kwargs):
        return {**original(*args, **kwargs), "logging_nan_inf_filter": True, "accelerator_config": None}

    trainer_mod.training_arguments = with_syncs
    try:
        yield
    finally:
        trainer_mod.training_arguments = original


def run_variant(name: str, *, out: Path, work: Path, cfg: dict, tok, examples: list[dict], batch: int, steps: int,
                warmup: int, seed: int, peak_tflops: float, training: dict, kd_cache: Path | None = None,
                kd: dict | None = None, attn: str = "sdpa", kd_full_head: bool = False,
                trainer_cls=None, max_wall_s: float | None = None, profile_dir: Path | None = None) -> dict:
    from distill_bench.energy import StageMeter
    from distill_bench.train.trainer import TrainSettings, train_student

    cuda = torch.cuda.is_available()
    training = dict(training)
    host_syncs = training.pop("_with_host_syncs", False)
    loss_eager = training.pop("_kd_loss_eager", False)
    accum = int(training.get("grad_accum", 1))
    budget, stream = budget_for(examples, steps * batch * accum, seed)
    settings = TrainSettings.from_dict(dict(
        token_budget=budget, max_length=max(len(e["input_ids"]) for e in examples), batch_size=batch, lr=1e-4,
        warmup_ratio=0.0, precision="bf16" if cuda else "fp32", save_steps=10 ** 6,
        **{"logging_steps": LOGGING_STEPS, **training}))
    if cuda:
        if not KEEP_POOL:
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
        if loss_eager:     # the loss's terms eager although the layers are compiled (the path before it compiled)
            trainer_cls = type(trainer_cls.__name__, (trainer_cls,), {"kd_compile_loss": False})
    clock = clock_callback(warmup, max_wall_s)
    callbacks = [clock]
    if profile_dir is not None:   # profiles the 3 steps after warm-up: this run is not a throughput sample
        callbacks.append(profiler_callback(warmup, 3, profile_dir, name))
    run_dir = work / name
    meter = StageMeter(stage="benchmark", stage_id=f"bench.trainer.{name}", role="student",
                       out_json=out / "energy" / f"{name}.json", settings=ENERGY, is_measuring_process=True,
                       install_signal_handlers=False)
    meter.start()
    t0 = time.perf_counter()
    status = "failed"
    summary: dict = {}
    if host_syncs:   # the step as before the sync-free changes: positions found on the GPU, NaN filter, blocking copies
        collator = collator or positionless_collator(tok.pad_token_id)
    try:
        with host_syncs_as_before(host_syncs):
            summary = train_student(model=model, tokenizer=tok, examples=examples, settings=settings, seed=seed,
                                    output_dir=run_dir, trainer_cls=trainer_cls, collator=collator, meter=meter,
                                    trainer_kwargs={"callbacks": callbacks}, fingerprint_extra={"bench": name})
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
    w = window_stats(stream, batch, warmup, last, model, accum)
    dt = tb - ta
    e = rec.get("energy", {})
    win_j = (eb - ea) / 1e3 if ea is not None and eb is not None else None
    res = {
        "variant": name, "kind": "kd" if kd_cache else "sft_gt", "attn": attn, "training": training,
        "batch": batch, "grad_accum": accum, "logging_steps": settings.logging_steps, "steps": last,
        "planned_steps": steps, "warmup_steps": warmup,
        "window_s": dt,
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
        "kd_loss_compiled": summary.get("kd_loss_compiled"),
        "resolved": {k: summary.get(k) for k in ("attn_implementation", "padding_free", "pad_to_multiple_of",
                                                 "torch_compile", "optim")},
        "allocator_in_window": {k: v - clock.allocator[warmup][k] for k, v in clock.allocator[last].items()},
        "graphs_compiled_in_window": clock.graphs[last] - clock.graphs[warmup],
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "keep_pool": KEEP_POOL,
        "train_runtime_s": summary.get("train_runtime_s"),
        "kd_info": {k: v for k, v in info.items() if k in ("kd_cache_k", "kd_top_k", "kd_value_dtype")} or None,
    }
    if status == "complete" and summary["trained_tokens"] != budget:
        raise RuntimeError(f"{name}: trained {summary['trained_tokens']} != budget {budget}")
    del model
    release()
    return res


# --keep-pool: the caching allocator's pool survives from one variant to the next, so a variant after the first
# (or after --throwaway) finds its blocks already reserved and makes no cudaMalloc inside its timed window
KEEP_POOL = False
# a study-length run logs every 50 optimizer steps (the package's default for runs of 2,500 steps or more); each log
# reads the loss and gradient norm on the host, a synchronisation. A benchmark run of ~100 steps would otherwise log
# every step, a synchronisation per step that the run it stands for does not have
LOGGING_STEPS = 50


def release() -> None:
    """Free the previous variant's model, optimizer and compiled graphs before the next one."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available() and not KEEP_POOL:
        torch.cuda.empty_cache()


def plain_ce_trainer_cls():
    """Diagnostic SFT trainer: torch CE over head(hidden) at loss positions only (distill_bench.train.head.add_positions_head)
    instead of TRL 1.16's fused chunked log-prob kernel (which also computes entropy and top-1 every step)."""
    import torch.nn.functional as F
    from trl import SFTTrainer

    from distill_bench.train.head import add_positions_head

    class PlainCESFTTrainer(SFTTrainer):
        loss_is_scaled_for_ga = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not add_positions_head(self.model):
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
    global KEEP_POOL, LOGGING_STEPS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip variants that would end past this wall time")
    ap.add_argument("--variants", default="", help="comma list to run, in this order (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="run the list this many times, alternating forward and "
                                                           "backward order (ABBA), each run reported")
    ap.add_argument("--throwaway", action="store_true", help="first a short unreported run of each variant")
    ap.add_argument("--logging-steps", type=int, default=LOGGING_STEPS,
                    help="log every N optimizer steps (each log is a host synchronisation; 50 = a study-length run)")
    ap.add_argument("--keep-pool", action="store_true",
                    help="keep the allocator's reserved memory between variants (no empty_cache)")
    ap.add_argument("--fresh-shapes", action="store_true",
                    help="each run its own data order (seed), so no run meets batch shapes an earlier run met "
                         "(a real run meets new lengths on nearly every step)")
    ap.add_argument("--examples", type=int, default=512, help="examples in the pool (KD caches them all)")
    ap.add_argument("--batch", type=int, default=4, help="rows per micro-batch (= per optimizer step)")
    ap.add_argument("--warmup-steps", type=int, default=0, help="at least this many steps before the window")
    ap.add_argument("--profile", default="", help="variants to profile (comma list; torch.profiler, 3 steps), each "
                                                  "in one extra run")
    ap.add_argument("--profile-warmup", type=int, default=20, help="steps before the profiled ones (past the "
                                                                     "recompilations new batch shapes cause)")
    ap.add_argument("--timed-s", type=float, default=20.0, help="target steady-state seconds per variant")
    ap.add_argument("--max-wall-s", type=float, default=110.0, help="stop a variant's training past this (s)")
    ap.add_argument("--fixed-cost-s", type=float, default=None,
                    help="expected set-up + compile seconds per run for the budget's skip rule (default: per variant)")
    ap.add_argument("--checks", default="sdpa,flex_attention",
                    help="attention kernels for the padding-free check (sdpa, eager, flex_attention, varlen)")
    a = ap.parse_args()
    KEEP_POOL = a.keep_pool
    LOGGING_STEPS = a.logging_steps
    out = Path(a.out)
    (out / "energy").mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    quick = a.quick
    d = dev()
    cfg = TINY if quick else OLMO2_1B
    lo, hi = (16, 64) if quick else (256, 2048)
    n_ex = 64 if quick else a.examples
    batch = a.batch
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
    varlen_ok = checks.get("varlen", {}).get("correct", False)
    vl = {"attn_implementation": "varlen"}   # a model built with SDPA, switched by train_student
    # the trainer's own defaults, resolved by train_student as a user's run would be
    gpu_defaults = {k: "auto" for k in ("padding_free", "pad_to_multiple_of", "torch_compile", "attn_implementation")}
    pad, pf, layers = {"padding_free": False}, {"padding_free": True}, {"torch_compile": "layers"}
    m0, m64 = {"pad_to_multiple_of": None}, {"pad_to_multiple_of": 64}
    plan = [  # name, kd?, training overrides, attn, est step s, warm-up steps, est fixed cost s, kd full head, run?
        ("sft_pad_eager", False, {**pad, **m0}, "sdpa", 0.30, 5, 25, False, True),
        ("sft_padfree_eager", False, {**pf, **m0}, "sdpa", 0.22, 5, 25, False, pf_ok),
        ("sft_padfree_layers", False, {**pf, **layers, **m0}, "sdpa", 0.16, 10, 70, False, pf_ok),
        ("kd_padfree_layers", True, {**pf, **layers, **m0}, "sdpa", 0.17, 10, 70, False, pf_ok),
        ("kd_padfree_eager", True, {**pf, **m0}, "sdpa", 0.23, 5, 25, False, pf_ok),
        ("sft_padfree_eager_m64", False, {**pf, **m64}, "sdpa", 0.20, 5, 25, False, pf_ok),
        ("sft_padfree_layers_m64", False, {**pf, **layers, **m64}, "sdpa", 0.16, 10, 70, False, pf_ok),
        ("kd_padfree_layers_m64", True, {**pf, **layers, **m64}, "sdpa", 0.17, 10, 70, False, pf_ok),
        ("sft_pad_eager_m64", False, {**pad, **m64}, "sdpa", 0.22, 5, 25, False, True),
        ("sft_padfree_flex_layers_m64", False, {**pf, **layers, **m64}, "flex_attention", 0.15, 10, 90, False,
         flex_ok),
        ("kd_padfree_flex_layers_m64", True, {**pf, **layers, **m64}, "flex_attention", 0.16, 10, 90, False,
         flex_ok),
        ("sft_padfree_varlen_layers_m64", False, {**pf, **layers, **m64, **vl}, "sdpa", 0.13, 10, 70, False,
         varlen_ok),
        ("kd_padfree_varlen_layers_m64", True, {**pf, **layers, **m64, **vl}, "sdpa", 0.14, 10, 70, False,
         varlen_ok),
        ("sft_gpu_defaults", False, dict(gpu_defaults), "sdpa", 0.12, 10, 70, False, True),
        ("sft_gpu_defaults_syncs", False, {**gpu_defaults, "_with_host_syncs": True}, "sdpa", 0.12, 10, 70, False,
         True),
        ("kd_gpu_defaults", True, dict(gpu_defaults), "sdpa", 0.13, 10, 70, False, True),
        # the optimizer step: HF's default fused AdamW vs foreach AdamW (training.optim)
        ("sft_gpu_defaults_foreach", False, {**gpu_defaults, "optim": "adamw_torch"}, "sdpa", 0.12, 10, 70, False,
         True),
        ("kd_gpu_defaults_foreach", True, {**gpu_defaults, "optim": "adamw_torch"}, "sdpa", 0.13, 10, 70, False,
         True),
        ("sft_gpu_defaults_fusedclip", False, {**gpu_defaults, "optim": "adamw_fused_clip"}, "sdpa", 0.12, 10, 70,
         False, True),
        ("kd_gpu_defaults_fusedclip", True, {**gpu_defaults, "optim": "adamw_fused_clip"}, "sdpa", 0.13, 10, 70,
         False, True),
        ("sft_gpu_defaults_compiledclip", False, {**gpu_defaults, "optim": "adamw_compiled_clip"}, "sdpa", 0.12,
         10, 90, False, True),
        ("kd_gpu_defaults_compiledclip", True, {**gpu_defaults, "optim": "adamw_compiled_clip"}, "sdpa", 0.13, 10,
         90, False, True),
        # two micro-batches per optimizer step: the optimizer's fixed cost shared by twice the tokens
        ("sft_gpu_defaults_ga2", False, {**gpu_defaults, "grad_accum": 2}, "sdpa", 0.22, 10, 70, False, True),
        ("kd_gpu_defaults_ga2", True, {**gpu_defaults, "grad_accum": 2}, "sdpa", 0.24, 10, 70, False, True),
        ("sft_gpu_defaults_ckpt", False, {**gpu_defaults, "gradient_checkpointing": True}, "sdpa", 0.16, 10, 70, False,
         True),
        ("kd_pad_eager", True, {**pad, **m0}, "sdpa", 0.25, 5, 25, False, True),
        ("sft_pad_layers", False, {**pad, **layers, **m0}, "sdpa", 0.20, 10, 70, False, True),
        ("sft_pad_eager_plaince", False, {**pad, **m0}, "sdpa", 0.24, 5, 25, False, True),
        ("kd_pad_eager_fullhead", True, {**pad, **m0}, "sdpa", 0.24, 5, 25, True, True),
        ("sft_pad_compile", False, {**pad, **m0, "torch_compile": True}, "sdpa", 0.14, 12, 90, False, True),
        ("kd_pad_eager_workers2", True, {**pad, **m0, "dataloader_workers": 2}, "sdpa", 0.22, 5, 25, False, True),
        # the KD collator (cache reads, teacher tensors) off the training thread, against the same without
        ("kd_gpu_defaults_fusedclip_workers2", True, {**gpu_defaults, "optim": "adamw_fused_clip",
                                                      "dataloader_workers": 2}, "sdpa", 0.13, 10, 70, False, True),
        # the KD loss's per-chunk terms eager although the layers are compiled (the KD path before the loss compiled
        # with them; runs before that change named kd_gpu_defaults* were this)
        ("kd_gpu_defaults_fusedclip_losseager", True, {**gpu_defaults, "optim": "adamw_fused_clip",
                                                       "_kd_loss_eager": True}, "sdpa", 0.13, 10, 70, False, True),
        # the collators in two DataLoader workers, as configs/workstation.yaml (the cluster config: four)
        ("kd_gpu_defaults_compiledclip_workers2", True, {**gpu_defaults, "optim": "adamw_compiled_clip",
                                                         "dataloader_workers": 2}, "sdpa", 0.13, 10, 90, False, True),
        ("sft_gpu_defaults_compiledclip_workers2", False, {**gpu_defaults, "optim": "adamw_compiled_clip",
                                                           "dataloader_workers": 2}, "sdpa", 0.12, 10, 90, False, True),
        ("sft_gpu_defaults_fusedclip_workers2", False, {**gpu_defaults, "optim": "adamw_fused_clip",
                                                        "dataloader_workers": 2}, "sdpa", 0.12, 10, 70, False, True),
    ]
    # eager unless a variant says otherwise (the trainer's GPU default is torch_compile: auto = layers),
    # and on the attention the variant names (the trainer's GPU default is attn_implementation: auto = varlen)
    plan = [(p[0], p[1], {"torch_compile": False, "attn_implementation": None, **p[2]}) + p[3:-1]
            for p in plan if p[-1]]
    want = [v for v in a.variants.split(",") if v]
    if want:   # the order given is the order run
        unknown = sorted(set(want) - {p[0] for p in plan})
        if unknown:
            raise SystemExit(f"unknown or unavailable variants {unknown}; have {[p[0] for p in plan]}")
        plan = [next(p for p in plan if p[0] == v) for v in want]
    # interleave: run the list forward, then backward, ... so drift and first-in-process costs fall on both sides
    order = []
    for rep in range(a.repeats):
        order += [(p, rep) for p in (plan if rep % 2 == 0 else plan[::-1])]
    if a.throwaway and order and not quick:   # each variant pays its one-time costs (Triton autotuning of its own
        # kernels, its collator's first reads, the allocator) before any timed run, not only the first variant
        order[:0] = [(("throwaway_" + p[0],) + p[1:], THROWAWAY_RUN) for p in plan]
    for name in filter(None, a.profile.split(",")):   # one extra, untimed run each: 3 profiled steps would
        if name not in {p[0] for p in plan}:              # distort a throughput sample
            raise SystemExit(f"--profile {name}: not among the variants run")
        order.append((next(p for p in plan if p[0] == name), PROFILE_RUN))
    runs = []
    for (name, is_kd, training, attn, step_s, warm, fixed, full_head), rep in order:
        if quick and training.get("dataloader_workers"):
            training = {k: v for k, v in training.items() if k != "dataloader_workers"}   # CPU forces workers = 0
        steps, warm = steps_for(step_s, max(warm, a.warmup_steps))
        if rep == THROWAWAY_RUN:
            steps = warm + 3
        elif rep == PROFILE_RUN:
            warm = min(warm, a.profile_warmup) if quick else a.profile_warmup
            steps = warm + 5
        need = (fixed if a.fixed_cost_s is None else a.fixed_cost_s) + steps * step_s * 1.3
        if not quick and left(a.budget_s) < need:
            log(f"skip {name} (rep {rep}): needs ~{need:.0f}s, {left(a.budget_s):.0f}s left")
            runs.append({"variant": name, "repeat": rep,
                         "skipped": f"budget ({left(a.budget_s):.0f}s left, needs ~{need:.0f}s)"})
            continue
        log(f"run {name} (rep {rep}): {steps} steps ({warm} warm-up)")
        run_seed = seed + len(runs) if a.fresh_shapes else seed
        try:
            r = run_variant(name, out=out, work=work, cfg=cfg, tok=tok, examples=examples, batch=batch, steps=steps,
                            warmup=warm, seed=run_seed, peak_tflops=peak, training=training,
                            kd_cache=cache if is_kd else None, kd=kd, attn=attn, kd_full_head=full_head,
                            trainer_cls=plain_ce_trainer_cls() if name.endswith("_plaince") else None,
                            max_wall_s=None if quick else a.max_wall_s,
                            profile_dir=out / "profile" if rep == PROFILE_RUN else None)
        except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
            traceback.print_exc()
            r = {"variant": name, "error": repr(e)[:400]}
            release()
        r["repeat"], r["seed"] = rep, run_seed
        runs.append(r)
        log(f"{name}: " + json.dumps({k: r.get(k) for k in ("tokens_per_s", "mfu", "step_s", "peak_mem_gib",
                                                            "resolved", "data_wait_fraction", "warmup_s", "error")},
                                     default=str))
        save(out, "trainer_runs", {"model": "tiny" if quick else "OLMo-2-0425-1B shape, random init",
                                   "device": ceil["device"], "torch": torch.__version__, "runs": runs})
    shutil.rmtree(work, ignore_errors=True)
    table(out, runs)


def fmt_table(head: tuple, rows: list[tuple]) -> str:
    w = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    lines = [" | ".join(str(h).ljust(w[i]) for i, h in enumerate(head))]
    lines += [" | ".join(str(x).ljust(w[i]) for i, x in enumerate(row)) for row in rows]
    return "\n".join(lines)


def variant_means(runs: list[dict]) -> dict[str, dict]:
    """Per variant over its clean repeats: mean, min and max tok/s, mean MFU and step. Left out: the throwaway run
    and runs that compiled a graph inside their timed window (a recompilation is not the steady state), counted
    in ``excluded``; a variant with no clean run keeps its runs, marked ``clean: False``."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        if "tokens_per_s" in r and r.get("repeat", 0) >= 0:
            by.setdefault(r["variant"], []).append(r)
    out = {}
    for name, all_runs in by.items():
        clean = [r for r in all_runs if not r.get("graphs_compiled_in_window")]
        rs = clean or all_runs
        tps = [r["tokens_per_s"] for r in rs]
        out[name] = {"kind": rs[0]["kind"], "n": len(rs), "tokens_per_s": sum(tps) / len(tps), "min": min(tps),
                     "max": max(tps), "mfu": sum(r["mfu"] for r in rs) / len(rs),
                     "step_s": sum(r["step_s"] for r in rs) / len(rs), "excluded": len(all_runs) - len(clean),
                     "clean": bool(clean)}
    return out


def sft_twin(name: str, means: dict[str, dict]) -> str | None:
    """The SFT variant a KD variant is compared with: the same settings if run, else the plain one."""
    exact = name.replace("kd_", "sft_", 1)
    if exact in means:
        return exact
    plain = exact.replace("_workers2", "").replace("_fullhead", "").replace("_losseager", "")
    return plain if plain in means else None


def alloc_cell(counters: dict | None) -> str:
    """Device mallocs / allocator retries inside the timed window ('-' on CPU)."""
    return f"{counters['num_device_alloc']}/{counters['num_alloc_retries']}" if counters else "-"


def table(out: Path, runs: list[dict]) -> None:
    head = ("variant", "rep", "tok/s", "MFU", "MFU(suite)", "step s", "pad %", "GiB", "J/tok", "wait %",
            "warm-up s", "mallocs/retries", "compiles")
    rows = []
    for r in runs:
        if "tokens_per_s" not in r:
            rows.append((r["variant"], r.get("repeat", ""), r.get("error", r.get("skipped", "?"))[:80])
                        + ("",) * (len(head) - 3))
            continue
        rows.append((r["variant"], r.get("repeat", 0), f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                     f"{100 * r['mfu_suite']:.1f}%", f"{r['step_s']:.3f}", f"{100 * r['pad_fraction']:.0f}",
                     f"{r['peak_mem_gib'] or 0:.1f}", f"{r['j_per_token']:.4f}" if r.get("j_per_token") else "-",
                     f"{100 * r['data_wait_fraction']:.1f}" if r.get("data_wait_fraction") is not None else "-",
                     f"{r['warmup_s']:.1f}", alloc_cell(r.get("allocator_in_window")),
                     str(r.get("graphs_compiled_in_window", "-"))))
    means = variant_means(runs)
    mrows = []
    for name, m in means.items():
        note = f"MFU/45% = {m['mfu'] / 0.45:.2f}"
        if m["excluded"]:
            note += (f"; {m['excluded']} run(s) compiled in the window, left out" if m["clean"]
                     else "; every run compiled in the window: no clean sample")
        twin = sft_twin(name, means) if m["kind"] == "kd" else None
        if twin:
            slower = 1 - m["tokens_per_s"] / means[twin]["tokens_per_s"]
            note += f"; KD {100 * abs(slower):.1f}% {'slower' if slower > 0 else 'faster'} than {twin}"
        mrows.append((name, m["n"], f"{m['tokens_per_s']:,.0f}", f"{m['min']:,.0f}-{m['max']:,.0f}",
                      f"{100 * m['mfu']:.1f}%", f"{m['step_s']:.3f}", note))
    text = fmt_table(head, rows) + "\n\nper variant, over its repeats:\n" + fmt_table(
        ("variant", "runs", "mean tok/s", "range", "MFU", "step s", "vs target"), mrows)
    (out / "table.txt").write_text(text + "\n")
    save(out, "summary", {"results": dict(RESULTS), "means": means, "wall_s": time.monotonic() - T0})
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
