"""Grouped-query decode attention for the CUDA-graph decode loop (``static_decode``).

Why: with a mask (left padding and a static cache always need one) transformers 5.24's SDPA path repeats K/V to
every query head before calling SDPA (``integrations/sdpa_attention.py: use_gqa_in_sdpa``), so a GQA model's decode
step copies its whole KV cache ``heads / kv_heads`` times per layer. On an H200, Llama-3.1-8B at batch 64 then
moved 1.1 TB/s of useful bytes (decode at 20 % of the weight roofline; docs/BENCHMARKS.md). For one query token
attention is two small batched matmuls per layer; grouping the query heads of each K/V head reads the cache once:

    scores[b, kv, g, t] = q[b, kv, g, :] . k[b, kv, t, :] * scale      (fp32 out on CUDA, as SDPA's kernels keep)
    out[b, kv, g, :]    = softmax_t(scores + mask) @ v[b, kv, :, :]

Prefill (more than one query token), dropout, soft-capping and attention sinks go to transformers' SDPA function
unchanged. Masks are transformers' SDPA masks (boolean "may attend", or additive float).
"""
from __future__ import annotations

import contextlib

import torch

NAME = "distill_bench_grouped_decode"


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` function: query [B, H, q, D], key/value [B, Hkv, T, D] -> ([B, q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    unsupported = (q_len != 1 or dropout or heads % kv_heads or kwargs.get("softcap") is not None
                   or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None)
    if unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = d ** -0.5 if scaling is None else scaling
    group = heads // kv_heads
    t = key.shape[2]
    q = query.reshape(b * kv_heads, group, d)
    k = key.reshape(b * kv_heads, t, d).transpose(1, 2)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        scores = torch.bmm(q, k, out_dtype=torch.float32)   # fp32 scores without an fp32 copy of the cache
    else:
        scores = torch.bmm(q, k).float()
    scores = scores.view(b, kv_heads, group, t) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, :t]              # [B or 1, 1 or H, 1, T]: the one query row
        if mask.shape[1] != 1:                           # per-head mask: split heads into (kv, group)
            mask = mask.reshape(mask.shape[0], kv_heads, group, t)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.bmm(probs.view(b * kv_heads, group, t), value.reshape(b * kv_heads, t, d))
    return out.view(b, heads, 1, d).transpose(1, 2), None


def register() -> str:
    """Make ``NAME`` a transformers attention implementation (with SDPA's mask format); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


@contextlib.contextmanager
def grouped_decode(model):
    """Run ``model`` with grouped decode attention inside the block, restoring its own implementation after.

    Only models whose attention is SDPA (or eager) are switched: flash/flex/paged implementations keep theirs."""
    current = model.config._attn_implementation
    if current not in ("sdpa", "eager"):
        yield False
        return
    model.set_attn_implementation(register())
    try:
        yield True
    finally:
        model.set_attn_implementation(current)
