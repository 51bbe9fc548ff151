"""Static-cache decode loop whose one-token step is captured in a CUDA graph (hf backend, ``hf_decode: graph``).

Why: HF ``generate`` with the dynamic cache is host-bound on a GPU (measured on an H100: 60 ms per decode step at
batch 64 for a 1B model whose weights read in 0.84 ms). Here the KV cache is a transformers ``StaticCache`` of one
fixed length per call, batches are padded to one row count, so the decode step (model forward for one token) has one
shape and is compiled once with ``torch.compile(mode="reduce-overhead", fullgraph=True)``, i.e. replayed as one CUDA
graph; the host only queues replays and checks for "all rows finished" every ``CHECK_EVERY`` steps instead of
synchronising each step. Prefill runs eagerly by default (its shape changes per batch); ``prefill="packed"`` runs
it padding-free: the batch's prompts laid end to end in one row, causal attention inside each prompt only
(``packed_prefill``), their K/V scattered into the static cache where the left-padded layout puts them, so a batch of
mixed lengths computes no padding; ``prefill="compiled"`` compiles the padded prefill once with dynamic shapes (one
graph for every prompt width; the whole model in one graph, so its compile time grows with the layer count).
Decode attention reads grouped K/V in place (``decode_attention``; ``attention="model"`` keeps the model's SDPA path,
which repeats K/V per query head).

Semantics equal HF ``generate`` (greedy: token for token, checked on CPU by tests/test_generation_static.py):
left-padded rows, position ids = cumulative attention mask - 1, a row that produced EOS gets the pad token
afterwards, decoding stops at ``max_new_tokens`` or when every row has finished. Sampling applies HF's temperature
and top-p warpers to float32 logits and draws with ``torch.multinomial``; it is seeded and reproducible but not
draw-for-draw identical to ``generate``'s sampling.
"""
from __future__ import annotations

import torch

from distill_bench.generation.decode_attention import grouped_decode
from distill_bench.generation.packed_prefill import packed_prefill

# decode attention: grouped = SDPA on grouped K/V (decode_attention.py, kernel "sdpa"), grouped_bmm = its two-bmm
# kernel, model = the model's own attention (transformers' SDPA path repeats K/V per query head under a mask)
DECODE_ATTENTION = ("grouped", "grouped_bmm", "model")
GROUPED_KERNEL = {"grouped": "sdpa", "grouped_bmm": "bmm"}
# torch.compile mode of the decode step: "reduce-overhead" replays it as a CUDA graph; "max-autotune" (benchmark A/B)
# also times Triton GEMM templates against cuBLAS per matmul shape, measured slower on an H200 (docs/BENCHMARKS.md)
DECODE_COMPILE_MODE = "reduce-overhead"
# prefill: eager (the model's own forward over the left-padded batch), packed (padding-free, packed_prefill.py) or
# compiled (the padded forward under torch.compile, dynamic shapes)
PREFILL = ("eager", "packed", "compiled")
CHECK_EVERY = 16  # decode steps between host checks of "all rows finished" (each check is one sync)
LEN_BUCKET = 64   # cache length is rounded up to this, so calls with similar lengths share one compiled graph


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts as one left-padded batch: (ids, attention mask), both [rows, longest], on the CPU."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` counts them: 0 at each prompt's first token, 0 on pads."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def cache_length(longest_prompt: int, max_new_tokens: int) -> int:
    n = longest_prompt + max_new_tokens
    return -(-n // LEN_BUCKET) * LEN_BUCKET


def _forward(model, input_ids, position_ids, attention_mask, cache):
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def _prefill_forward(model, input_ids, position_ids, attention_mask, cache):
    """The prefill's own code object, so its compiled graph never shares dynamo's cache entries with the decode step."""
    return _forward(model, input_ids, position_ids, attention_mask, cache)


class StaticDecoder:
    """One static KV cache (rows x max_cache_len) and one compiled decode step, reused for every batch of a call."""

    def __init__(self, model, rows: int, max_cache_len: int, *, compile: bool, attention: str = "grouped",
                 prefill: str = "eager"):
        from transformers import StaticCache

        if attention not in DECODE_ATTENTION:
            raise ValueError(f"decode attention must be one of {', '.join(DECODE_ATTENTION)}, got {attention!r}")
        if prefill not in PREFILL:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL)}, got {prefill!r}")
        self.model, self.rows, self.max_cache_len = model, rows, max_cache_len
        self.attention = attention
        self.device = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.compiled = compile
        self.timings: list[dict] = []  # per batch: prefill_s, decode_s, decode_steps (CUDA events on GPU)
        self.step = (torch.compile(_forward, mode=DECODE_COMPILE_MODE, fullgraph=True, dynamic=False) if compile
                     else _forward)
        self.prefill = prefill
        self.prefill_step = (torch.compile(_prefill_forward, fullgraph=True, dynamic=True) if prefill == "compiled"
                             else _forward)

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
        """``ids``/``mask``: [rows, width] left-padded on the model's device. Returns [rows, n] new tokens (n <=
        max_new_tokens; pad after a row's EOS), like ``generate(...)[:, width:]``. Keywords: ``_decode``'s."""
        if self.attention == "model":
            return self._decode(ids, mask, **kw)
        with grouped_decode(self.model, GROUPED_KERNEL[self.attention]):
            return self._decode(ids, mask, **kw)

    @torch.no_grad()
    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, eos: set[int], pad_id: int,
                greedy: bool, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
        rows, width = ids.shape
        if rows != self.rows or width + max_new_tokens > self.max_cache_len:
            raise ValueError(f"batch {tuple(ids.shape)} + {max_new_tokens} new tokens does not fit the static cache "
                             f"({self.rows} rows x {self.max_cache_len})")
        dev = self.device
        self.cache.reset()
        # one mask for the whole batch: prompt padding zeros, then ones; causality hides the not-yet-written slots
        full_mask = torch.ones((rows, self.max_cache_len), dtype=mask.dtype, device=dev)
        full_mask[:, :width] = mask
        pos = position_ids(mask)
        clock = _Clock(dev)
        if self.prefill == "packed":
            logits = packed_prefill(self.model, ids, mask, pos, self.cache)
        else:
            logits = self.prefill_step(self.model, ids, pos, full_mask[:, :width], self.cache)
        clock.mark()
        next_pos = pos[:, -1:] + 1
        eos_t = torch.tensor(sorted(eos), device=dev)
        warp = None if greedy else _warpers(temperature, top_p)
        out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        unfinished = torch.ones(rows, dtype=torch.bool, device=dev)
        n = max_new_tokens
        tok = None
        for t in range(max_new_tokens):
            if t > 0:
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self.step(self.model, tok[:, None], next_pos, full_mask, self.cache)
                next_pos = next_pos + 1
            if warp is None:
                tok = logits.argmax(-1)
            else:
                probs = torch.softmax(warp(None, logits), dim=-1)
                tok = torch.multinomial(probs, num_samples=1).squeeze(1)
            tok = torch.where(unfinished, tok, pad_id)
            out[:, t] = tok
            unfinished &= ~torch.isin(tok, eos_t)
            if (t + 1) % CHECK_EVERY == 0 and t + 1 < max_new_tokens and not bool(unfinished.any()):
                n = t + 1
                break
        clock.mark()
        prefill_s, decode_s = clock.intervals()
        self.timings.append({"rows": rows, "width": width, "prefill_s": prefill_s, "decode_s": decode_s,
                             "decode_steps": n - 1})
        out = out[:, :n]
        # generate stops at the first step where every row is done; trim the all-pad tail the coarse check left
        done_at = _all_finished_step(out, eos_t)
        return out[:, :done_at] if done_at is not None else out


class _Clock:
    """Marks on the device stream (CUDA events: no sync until read) or the host clock on CPU."""

    def __init__(self, device):
        import time

        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self.marks = []
        self._time = time.perf_counter
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(self._time())

    def intervals(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _all_finished_step(out: torch.Tensor, eos_t: torch.Tensor) -> int | None:
    hit = torch.isin(out, eos_t)
    if not bool(hit.any(dim=1).all()):
        return None
    return int(hit.int().argmax(dim=1).max()) + 1


def _warpers(temperature: float, top_p: float):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p)))
    return procs
