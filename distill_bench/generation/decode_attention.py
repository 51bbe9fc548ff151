"""Grouped-query decode attention for the CUDA-graph decode loop (``static_decode``).

Why: with a mask (left padding and a static cache always need one) transformers 5.24's SDPA path repeats K/V to
every query head before calling SDPA (``integrations/sdpa_attention.py: use_gqa_in_sdpa``), so a GQA model's decode
step copies its whole KV cache ``heads / kv_heads`` times per layer. On an H200, Llama-3.1-8B at batch 64 then
moved 1.1 TB/s of useful bytes (decode at 20 % of the weight roofline; docs/BENCHMARKS.md). Here, for one query
token, the cache is read once, in one of two ways (``KERNELS``):

* ``sdpa``: ``scaled_dot_product_attention(q, k, v, attn_mask, enable_gqa=True)`` on the grouped K/V (PyTorch picks
  the kernel);
* ``bmm``: the query heads that share a K/V head grouped into two batched matmuls,
  ``scores[b, kv, g, t] = q[b, kv, g, :] . k[b, kv, t, :] * scale`` (fp32 out on CUDA), softmax in fp32, ``@ v``.

Prefill (more than one query token), dropout, soft-capping and attention sinks go to transformers' SDPA function
unchanged. Masks are transformers' SDPA masks (boolean "may attend", or additive float).
"""
from __future__ import annotations

import contextlib

import torch

KERNELS = ("sdpa", "bmm")
NAMES = {kernel: f"distill_bench_grouped_decode_{kernel}" for kernel in KERNELS}


def _decode_step_inputs(module, query, key, dropout, kwargs) -> bool:
    """True when this call is one decode token this module computes; else transformers' SDPA function runs."""
    heads, kv_heads = query.shape[1], key.shape[1]
    return not (query.shape[2] != 1 or dropout or heads % kv_heads or kwargs.get("softcap") is not None
                or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None)


def _one_query_row(attention_mask, t: int):
    return None if attention_mask is None else attention_mask[:, :, -1:, :t]   # [B or 1, 1 or H, 1, T]


def sdpa_grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` function: query [B, H, q, D], key/value [B, Hkv, T, D] -> ([B, q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _decode_step_inputs(module, query, key, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=_one_query_row(attention_mask, key.shape[2]), scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


def bmm_grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` function: query [B, H, q, D], key/value [B, Hkv, T, D] -> ([B, q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _decode_step_inputs(module, query, key, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, _, d = query.shape
    kv_heads, t = key.shape[1], key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    group = heads // kv_heads
    q = query.reshape(b * kv_heads, group, d)
    k = key.reshape(b * kv_heads, t, d).transpose(1, 2)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        scores = torch.bmm(q, k, out_dtype=torch.float32)   # fp32 scores without an fp32 copy of the cache
    else:
        scores = torch.bmm(q, k).float()
    scores = scores.view(b, kv_heads, group, t) * scale
    mask = _one_query_row(attention_mask, t)
    if mask is not None:
        if mask.shape[1] != 1:                           # per-head mask: split heads into (kv, group)
            mask = mask.reshape(mask.shape[0], kv_heads, group, t)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.bmm(probs.view(b * kv_heads, group, t), value.reshape(b * kv_heads, t, d))
    return out.view(b, heads, 1, d).transpose(1, 2), None


def register(kernel: str = "sdpa") -> str:
    """Make ``NAMES[kernel]`` a transformers attention implementation (with SDPA's mask format); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if kernel not in KERNELS:
        raise ValueError(f"grouped decode kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    function = {"sdpa": sdpa_grouped_attention, "bmm": bmm_grouped_attention}[kernel]
    AttentionInterface.register(NAMES[kernel], function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAMES[kernel], sdpa_mask)
    return NAMES[kernel]


@contextlib.contextmanager
def grouped_decode(model, kernel: str = "sdpa"):
    """Run ``model`` with grouped decode attention inside the block, restoring its own implementation after.

    Only models whose attention is SDPA (or eager) are switched: flash/flex/paged implementations keep theirs."""
    current = model.config._attn_implementation
    if current not in ("sdpa", "eager"):
        yield False
        return
    model.set_attn_implementation(register(kernel))
    try:
        yield True
    finally:
        model.set_attn_implementation(current)
