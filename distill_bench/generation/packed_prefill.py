"""Padding-free prefill for the static-cache decode loop (``StaticDecoder(prefill="packed")``).

Why: a left-padded prefill computes every pad position of every layer. Prompts of mixed lengths in a batch of 64
pad to the longest, which at 128-512-token prompts is about a quarter of the prefill's matmul work, and prefill is
half of a large teacher's generation time (docs/BENCHMARKS.md). Here the batch's prompts are laid end to end in one
row (position ids restart at each prompt), attention stays causal inside each prompt (PyTorch's flash varlen kernel
on a GPU, one causal SDPA per prompt elsewhere), and each layer's K/V are written straight into the static cache at
the slots the left-padded layout gives them. The decode steps that follow read the same cache as after a padded
prefill (pad slots hold zeros instead of pad-token K/V; the mask hides both). Only the last position of each prompt
goes through the LM head.

On CUDA the prefill also runs the RMSNorms, the rotary embedding and the SwiGLU product as fused kernels
(``fused_elementwise``): eagerly each is several passes over the activations (a norm six, over fp32 copies; the
rotary embedding's multiply, negate, concatenate and add on q and k), together over a quarter of a 32B teacher's
prefill time (docs/BENCHMARKS.md). The fused functions compute the same expressions, rounding where the model's
code rounds, one pass each.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch

NAME = "distill_bench_packed_prefill"   # the transformers AttentionInterface key
# fuse the norms, rotary embedding and SwiGLU product during a CUDA prefill (benchmarks set it False to measure
# what fusing saves)
FUSE_ELEMENTWISE = True
# RMSNorm classes whose forward is the expression below, by where they cast back to the input dtype: OLMo-2 applies
# the weight in fp32 and casts once; Llama and Qwen2 cast, then apply the weight in the input dtype
RMS_NORMS = {"Olmo2RMSNorm": "after_weight", "LlamaRMSNorm": "before_weight", "Qwen2RMSNorm": "before_weight"}
SWIGLU_MLPS = ("Olmo2MLP", "LlamaMLP", "Qwen2MLP")   # forward: down_proj(act_fn(gate_proj(x)) * up_proj(x))
SILU = ("SiLU", "SiLUActivation")   # torch's and transformers' act_fn classes for hidden_act "silu"/"swish"
# attention classes whose forward calls their modelling file's module-level apply_rotary_pos_emb(q, k, cos, sin)
ROTARY_ATTENTIONS = ("Olmo2Attention", "LlamaAttention", "Qwen2Attention")


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


def _fuses(ids: torch.Tensor) -> bool:
    """Fused kernels where they pay: on CUDA (on a CPU the compile costs more than the passes it saves)."""
    return FUSE_ELEMENTWISE and ids.is_cuda


def _varlen_runs(query: torch.Tensor) -> bool:
    from distill_bench.train import varlen

    return query.is_cuda and varlen.available()


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
    if _varlen_runs(query):
        return varlen.varlen_attention(module, query, key, value, None, scaling=scaling,
                                       cu_seq_lens_q=cu_seq_lens_q, longest=kwargs.get("max_length_q"))
    bounds = cu_seq_lens_q.tolist()
    grouped = key.shape[1] != query.shape[1]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=grouped)
        for a, b in zip(bounds, bounds[1:])], dim=2)
    return out.transpose(1, 2), None


def _rms_normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm_cast_after_weight(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (weight * _rms_normalised(x, eps)).to(x.dtype)


def _rms_norm_cast_before_weight(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * _rms_normalised(x, eps).to(x.dtype)


def _silu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@functools.cache
def _compiled(fn):
    """One compiled graph per function for every prompt-set size (dynamic shapes); shared by all layers, whose
    weights are arguments. Intermediate casts to bf16/fp16 round as they do eagerly (Inductor would otherwise keep
    fp32 between fused ops), so the fused kernels give the model's own numbers."""
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


@contextlib.contextmanager
def fused_elementwise(model, enabled: bool = True):
    """While open, the model's known RMSNorms and SwiGLU MLPs run their elementwise work as fused (compiled) kernels,
    and its known attention classes call their modelling file's own ``apply_rotary_pos_emb`` compiled; modules of
    other classes, or MLPs with another activation, keep their own forward. Restores every forward and function on
    exit, so graphs compiled over the model elsewhere (the decode step) see it unchanged. Yields how many modules
    and modelling files it patched."""
    patched = []
    rotary: dict[str, object] = {}   # modelling module name -> its own apply_rotary_pos_emb
    try:
        if enabled:
            norms = {"after_weight": _compiled(_rms_norm_cast_after_weight),
                     "before_weight": _compiled(_rms_norm_cast_before_weight)}
            silu_product = _compiled(_silu_product)
            for module in model.modules():
                kind, home = type(module).__name__, type(module).__module__
                if kind in RMS_NORMS:
                    module.forward = functools.partial(norms[RMS_NORMS[kind]], weight=module.weight,
                                                       eps=module.variance_epsilon)
                    patched.append(module)
                elif kind in SWIGLU_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
                    module.forward = (lambda x, m=module: m.down_proj(silu_product(m.gate_proj(x), m.up_proj(x))))
                    patched.append(module)
                elif (kind in ROTARY_ATTENTIONS and home not in rotary
                      and hasattr(sys.modules[home], "apply_rotary_pos_emb")):
                    rotary[home] = sys.modules[home].apply_rotary_pos_emb
                    sys.modules[home].apply_rotary_pos_emb = _compiled(rotary[home])
        yield len(patched) + len(rotary)
    finally:
        for module in patched:
            del module.forward
        for home, own in rotary.items():
            sys.modules[home].apply_rotary_pos_emb = own


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
        with fused_elementwise(model, enabled=_fuses(ids)):
            out = model(input_ids=ids[row_idx, col_idx][None], position_ids=positions[row_idx, col_idx][None],
                        use_cache=False, logits_to_keep=(cu[1:] - 1).long(), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=width, max_length_k=width, packed_cache=writer)
    finally:
        model.set_attn_implementation(current)
    return out.logits[0].float()
