"""Padding-free attention through PyTorch's flash-attention varlen kernel (``training.attn_implementation: varlen``).

Why: with SDPA a padding-free row (several documents, position_ids) gets a dense [T, T] block-diagonal mask, so the
kernel computes every cross-document score and, on an H100 with torch 2.11, runs cuDNN's attention with ~1.6-1.9 ms
of host time per layer call (profile in docs/BENCHMARKS.md). The varlen kernel takes the document boundaries
(``cu_seq_lens_q``, which TRL's padding-free collator already emits) and computes only the causal blocks inside each
document; transformers builds no mask at all for an attention implementation without a mask function.

Only padding-free batches: a batch without ``cu_seq_lens_q`` is refused (never silently attended without a mask).
Needs a CUDA GPU and bf16/fp16 activations (fp32 inputs are cast to the autocast dtype, else bf16). GQA models get
K/V repeated to every head (torch 2.11's ``varlen_attn`` has no ``enable_gqa``).
"""
from __future__ import annotations

CONFIG_NAME = "varlen"                 # the training.attn_implementation value
NAME = "distill_bench_varlen"          # the transformers AttentionInterface key
# model types whose attention is plain causal (no sliding window, soft-capping or sinks): what "auto" switches
AUTO_MODEL_TYPES = ("llama", "olmo", "olmo2", "qwen2")


def available() -> bool:
    """This torch has the varlen kernel module (torch >= 2.10) and a CUDA device."""
    try:
        import torch
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def auto_applies(config, kernel_available: bool | None = None) -> bool:
    """``training.attn_implementation: auto`` uses varlen for padding-free GPU training of these models only
    (a Qwen2 config with use_sliding_window false carries sliding_window None: plain causal attention)."""
    if kernel_available is None:
        kernel_available = available()
    return (config.model_type in AUTO_MODEL_TYPES and config._attn_implementation == "sdpa"
            and not getattr(config, "sliding_window", None) and kernel_available)


def _kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                     longest: int | None = None, **kwargs):
    """``AttentionInterface`` function: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None).

    ``longest``: the longest document, where the caller knows it without reading the boundaries back from the device
    (the packed prefill: its batch's width); the kernel launches work blocks for that many positions of every
    document. Unknown, the row's length bounds it (training: a value per batch would recompile the compiled layers)."""
    import torch   # here, not at import: the trainer (and so every stage resolving it) imports this module

    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("training.attn_implementation=varlen needs padding-free batches (one flattened row with "
                         "cu_seq_lens_q, as LMCollator(padding_free=True) lays them out)")
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ValueError("training.attn_implementation=varlen: attention dropout, sliding windows, soft-capping "
                         "and sinks are not supported; use sdpa or flash_attention_2")
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    dtype = query.dtype
    if query.is_cuda and dtype not in (torch.bfloat16, torch.float16):   # the flash kernel takes 16-bit inputs
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))   # [T, H, D]
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    t = longest or q.shape[0]
    out = _kernel()(q, k, v, cu, cu, t, t, scale=scaling, window_size=(-1, 0))   # (-1, 0): causal
    return out.to(query.dtype).unsqueeze(0), None


def register() -> str:
    """Make ``NAME`` an attention implementation; no mask function, so transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME
