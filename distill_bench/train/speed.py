"""GPU speed settings of the student trainer: padding-free batches and regional (per decoder layer) compilation.

Both are measured in docs/BENCHMARKS.md ("Real trainer path"). Neither changes what is learned: a padding-free batch
gives the padded batch's per-token log-probs (checked in tests/test_train.py and on the GPU by
benchmarks/gpu_trainer.py), and compiling a layer changes kernels, not the function.
"""
from __future__ import annotations

from typing import Any

from distill_bench.defaults import is_sharded, section_defaults
from distill_bench.train.varlen import CONFIG_NAME, auto_applies

TRAINING_DEFAULTS = section_defaults("training")

COMPILE_MODES = ("none", "model", "layers")
# attention kernels that keep packed documents apart when a batch has position_ids and no attention mask
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "varlen")


def resolve_compile(value: Any, *, on_gpu: bool, sharded: bool = False) -> str:
    """``training.torch_compile``: false/none, true/model (HF Trainer compiles the whole model), layers, or "auto"
    = layers on a GPU (+48 % tok/s on an H200, docs/BENCHMARKS.md), none on CPU (compile time outweighs tiny runs)
    and none when FSDP shards the model (``sharded``: the layers would be compiled before the Trainer shards them,
    which ``defaults.NOT_WITH_SHARDING`` says FSDP cannot run; TrainSettings refuses an explicit layers there).
    """
    if value == "auto":
        return "layers" if on_gpu and not sharded else "none"
    if value is False or value is None:
        return "none"
    if value is True:
        return "model"
    if value in COMPILE_MODES:
        return value
    raise ValueError(f"training.torch_compile must be one of false, true, 'auto', "
                     f"{', '.join(map(repr, COMPILE_MODES))}; got {value!r}")


def resolve_padding_free(value: Any, *, on_gpu: bool, attn_implementation: str | None) -> bool:
    """``training.padding_free``: true/false, or "auto" = on for a GPU whose attention keeps documents apart.

    On a GPU the padded positions are pure waste (~30 % at batch 4 with lengths 256-2048; padding-free measured
    +29 % tok/s on an H100). On a CPU the block-diagonal mask over one long row is slower than padding, so auto
    keeps padding there.
    """
    if value is True or value is False:
        return value
    if value != "auto":
        raise ValueError(f"training.padding_free must be true, false or 'auto', got {value!r}")
    return on_gpu and (attn_implementation or "sdpa") in PACKED_ATTENTION


GPU_PAD_MULTIPLE = 64


def resolve_pad_multiple(value: Any, *, on_gpu: bool) -> int | None:
    """``training.pad_to_multiple_of``: null, a positive integer, or "auto" = 64 on a GPU, none on CPU.

    On a GPU a matmul of a shape seen for the first time costs extra (docs/BENCHMARKS.md: measured per new shape),
    and variable-length batches make nearly every step new; 64 caps the distinct lengths at max_length/64 for at
    most 63 pad positions per row (padded) or per step (padding-free). CPU runs of short rows would mostly pad.
    """
    if value is None:
        return None
    if value == "auto":
        return GPU_PAD_MULTIPLE if on_gpu else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"training.pad_to_multiple_of must be a positive integer, null or 'auto', got {value!r}")
    return value


def resolve_attention(value: Any, config, *, padding_free: bool, on_gpu: bool,
                      varlen_available: bool | None = None) -> str | None:
    """``training.attn_implementation`` for one model: an explicit value as is; "auto" = the varlen kernel for
    padding-free GPU training of a plain-causal architecture (train/varlen.py), else None (the model's own)."""
    if value != "auto":
        return value
    if padding_free and on_gpu and auto_applies(config, varlen_available):
        return CONFIG_NAME
    return None


def resolve_gpu_defaults(training: Any, config, *, on_gpu: bool, varlen_available: bool | None = None
                         ) -> dict[str, Any]:
    """What the trainer runs for this model: attention kernel, padding-free rows, pad multiple, compile mode.

    ``training``: TrainSettings or the config's training section; ``config``: the model's transformers config.
    The same resolution the trainer applies (with its own LMCollator), so a config can be checked per architecture
    on a machine without the GPU."""
    get = (lambda k, d: training.get(k, d)) if isinstance(training, dict) else (lambda k, d: getattr(training, k, d))
    explicit = get("attn_implementation", "auto")
    own = getattr(config, "_attn_implementation", None) or "sdpa"
    padding_free = resolve_padding_free(get("padding_free", "auto"), on_gpu=on_gpu,
                                        attn_implementation=(explicit if explicit != "auto" else None) or own)
    attn = resolve_attention(explicit, config, padding_free=padding_free, on_gpu=on_gpu,
                             varlen_available=varlen_available)
    return {"model_type": config.model_type, "attn_implementation": attn or own, "padding_free": padding_free,
            "pad_to_multiple_of": resolve_pad_multiple(get("pad_to_multiple_of", "auto"), on_gpu=on_gpu),
            "torch_compile": resolve_compile(get("torch_compile", "auto"), on_gpu=on_gpu, sharded=is_sharded(
                get("distributed", TRAINING_DEFAULTS["distributed"]),
                get("gpus", TRAINING_DEFAULTS["gpus"]) * get("nodes", TRAINING_DEFAULTS["nodes"])))}


def _layers_by_class(model) -> list:
    """The modules of ``model`` whose classes HF lists in ``_no_split_modules`` (its repeated transformer blocks)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def decoder_layers(model) -> list:
    """The repeated transformer blocks of ``model`` (the classes HF lists in ``_no_split_modules``)."""
    layers = _layers_by_class(model)
    if not layers:
        names = sorted(set(getattr(model, "_no_split_modules", None) or []))
        raise ValueError(f"training.torch_compile: layers needs a model whose decoder-layer classes are listed in "
                         f"_no_split_modules; {type(model).__name__} lists {names or 'none'}")
    return layers


def layers_compiled(model) -> bool:
    """Whether :func:`compile_decoder_layers` compiled this model's decoder layers (``nn.Module.compile`` keeps the
    compiled call on the module)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in _layers_by_class(model))


def compile_decoder_layers(model) -> int:
    """Compile each decoder layer in place (``nn.Module.compile``; state-dict keys unchanged, checkpoints portable).

    Regional compilation: every layer runs the same code, so dynamo traces one graph and reuses it; the un-fused
    elementwise work (norms, rotary, SwiGLU) is what it removes (34 -> 55 % MFU in gpu_suite's tight loop). Shapes
    start static and turn dynamic at the first new length (torch's automatic dynamic shapes), so variable-length
    batches recompile once, not every step. Returns the number of layers compiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
