"""Padding-free prefill for the static-cache decode loop (``StaticDecoder(prefill="packed")``).

Why: a left-padded prefill computes every pad position of every layer. Prompts of mixed lengths in a batch of 64
pad to the longest, which at 128-512-token prompts is about a quarter of the prefill's matmul work, and prefill is
half of a large teacher's generation time (docs/BENCHMARKS.md). Here the batch's prompts are laid end to end in one
row (position ids restart at each prompt), attention stays causal inside each prompt (PyTorch's flash varlen kernel
on a GPU, one causal SDPA per prompt elsewhere), and each layer's K/V are written straight into the static cache at
the slots the left-padded layout gives them. The decode steps that follow read the same cache as after a padded
prefill (pad slots hold zeros instead of pad-token K/V; the mask hides both). Only the last position of each prompt
goes through the LM head.
"""
from __future__ import annotations

import torch

NAME = "distill_bench_packed_prefill"   # the transformers AttentionInterface key


class CacheWriter:
    """Writes one layer's packed K/V [1, Hkv, T, D] into a transformers ``StaticCache`` at (row, column) per token,
    and sets the layer's length to the batch width, as a padded prefill of that width would have."""

    def __init__(self, cache, rows: torch.Tensor, cols: torch.Tensor, batch_rows: int, width: int):
        self.cache, self.rows, self.cols, self.batch_rows, self.width = cache, rows, cols, batch_rows, width

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        layer = self.cache.layers[layer_idx]
        if not layer.is_initialized:   # the static tensors are allocated at a layer's first write
            layer.lazy_initialization(key.new_empty((self.batch_rows, key.shape[1], 0, key.shape[3])),
                                      value.new_empty((self.batch_rows, value.shape[1], 0, value.shape[3])))
        layer.keys[self.rows, :, self.cols] = key[0].transpose(0, 1).to(layer.keys.dtype)
        layer.values[self.rows, :, self.cols] = value[0].transpose(0, 1).to(layer.values.dtype)
        layer.cumulative_length.fill_(self.width)   # in place: the decode graph holds this tensor's address


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, packed_cache=None,
                     cu_seq_lens_q=None, **kwargs):
    """``AttentionInterface`` function: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None); the
    K/V go to the static cache first."""
    from distill_bench.train import varlen

    if packed_cache is None or cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("packed prefill attention needs one packed row, its prompt boundaries (cu_seq_lens_q) "
                         "and the cache writer (packed_cache)")
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ValueError("packed prefill supports plain causal attention only (no dropout, sliding window, "
                         "soft-capping or sinks)")
    packed_cache.write(module.layer_idx, key, value)
    if query.is_cuda and varlen.available():
        return varlen.varlen_attention(module, query, key, value, None, scaling=scaling,
                                       cu_seq_lens_q=cu_seq_lens_q)
    bounds = cu_seq_lens_q.tolist()
    grouped = key.shape[1] != query.shape[1]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=grouped)
        for a, b in zip(bounds, bounds[1:])], dim=2)
    return out.transpose(1, 2), None


def register() -> str:
    """Make ``NAME`` an attention implementation; no mask function, so transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME


@torch.no_grad()
def packed_prefill(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Prefill the left-padded batch ``ids``/``mask`` [rows, width] (``positions``: its position ids) without its
    padding; fills ``cache`` like the padded prefill and returns the last prompt position's logits [rows, V]."""
    rows, width = ids.shape
    keep = mask.bool()
    row_idx, col_idx = keep.nonzero(as_tuple=True)   # row-major: each prompt's tokens in order, prompt after prompt
    lengths = keep.sum(-1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    writer = CacheWriter(cache, row_idx, col_idx, rows, width)
    current = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        out = model(input_ids=ids[row_idx, col_idx][None], position_ids=positions[row_idx, col_idx][None],
                    use_cache=False, logits_to_keep=(cu[1:] - 1).long(), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=width, max_length_k=width, packed_cache=writer)
    finally:
        model.set_attn_implementation(current)
    return out.logits[0].float()
