"""Model construction and loading: Llama from an architecture dict, or an HF dir / `model_ref.json` pointer.

A `model_ref.json` ({"name_or_path": ...}) stands in for a big cluster model we never copy into results/.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from distill_bench.atomic import atomic_write_json, write_dir_atomically
from distill_bench.models.tokenizer import assert_same_tokenizer, load_tokenizer, vocab_hash
from distill_bench.refs import load_error, missing_local_path

MODEL_REF = "model_ref.json"
ARCH_KEYS = {"hidden_size", "num_layers", "num_heads", "intermediate_size", "num_kv_heads",
             "max_position_embeddings"}
REQUIRED_ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size")


def init_model_from_arch(arch: Mapping[str, Any], tokenizer, seed: int):
    """A freshly initialised LlamaForCausalLM (tied embeddings) sized by ``arch``, vocabulary from ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    unknown = sorted(set(arch) - ARCH_KEYS)
    if unknown:
        raise ValueError(f"arch: unknown key(s) {unknown}; allowed: {sorted(ARCH_KEYS)}")
    missing = [k for k in REQUIRED_ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"arch: missing key(s) {missing}")
    hidden, heads = int(arch["hidden_size"]), int(arch["num_heads"])
    kv_heads = int(arch.get("num_kv_heads") or heads)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"arch: hidden_size ({hidden}) must be divisible by num_heads ({heads}) and num_heads by "
                         f"num_kv_heads ({kv_heads})")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(arch["intermediate_size"]),
        num_hidden_layers=int(arch["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=int(arch.get("max_position_embeddings") or 2048),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seeding must not leak into the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def write_model_ref(out_dir: str | os.PathLike, name_or_path: str, **extra: Any) -> Path:
    """Write ``out_dir/model_ref.json`` atomically (the dir is created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"name_or_path": str(name_or_path), **extra}
    return atomic_write_json(out / MODEL_REF, payload, sort_keys=True, allow_nan=True)


def resolve_model_ref(ref: str | os.PathLike) -> str:
    """The path/id to load: the pointer inside ``ref/model_ref.json`` if present, else ``ref`` itself.

    Raises FileNotFoundError naming the path when ``ref`` is a local path that is missing or holds no model.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        ref_file = path / MODEL_REF
        if ref_file.is_file():
            try:
                target = json.loads(ref_file.read_text())["name_or_path"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{ref_file}: not a valid model_ref.json (need {{\"name_or_path\": ...}}): "
                                 f"{exc}") from exc
            if not target:
                raise ValueError(f"{ref_file}: name_or_path is empty")
            return str(target)
        if (path / "config.json").is_file():
            return str(path)
        raise FileNotFoundError(f"model path {str(ref)!r} is a directory but holds neither config.json nor "
                                f"{MODEL_REF}")
    if path.exists():
        raise FileNotFoundError(f"model path {str(ref)!r} is a file, not a model directory")
    if missing_local_path(str(ref)):
        raise FileNotFoundError(f"model path {str(ref)!r} does not exist (hub ids look like 'owner/name')")
    return str(ref)  # an HF hub id (distill_bench.refs has the rule)


def _dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    try:
        return names[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


def load_model(ref: str | os.PathLike, dtype=None, device=None):
    """AutoModelForCausalLM from an HF dir, a dir with model_ref.json, or an HF id; clear error naming ``ref``."""
    from transformers import AutoModelForCausalLM

    target = resolve_model_ref(ref)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as exc:
        via = f"via {Path(ref) / MODEL_REF}" if target != str(ref) else None
        raise load_error(target, "causal LM", exc, via) from exc
    if device is not None:
        model.to(device)
    return model


def tokenizer_source_for_model(ref: str | os.PathLike) -> str | None:
    """Where the tokenizer belonging to model ``ref`` lives (a pointer's configured ``tokenizer`` first), or None if
    the model dir carries none."""
    pointer = Path(ref).expanduser() / MODEL_REF
    if pointer.is_file():
        configured = json.loads(pointer.read_text()).get("tokenizer")
        if configured:
            return str(configured)
    target = resolve_model_ref(ref)
    p = Path(target)
    if p.is_dir():
        has = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return str(p) if has else None
    return target  # hub id: its tokenizer travels with it


def save_model_dir(model, out_dir: str | os.PathLike, tokenizer=None, state_dict=None) -> Path:
    """save_pretrained (model + optional tokenizer) into a temp sibling dir, then rename over ``out_dir``.
    ``state_dict``: the weights to write instead of the module's own (e.g. gathered from FSDP shards)."""
    def write(tmp: Path) -> None:
        if state_dict is None:
            model.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_dir_atomically(out_dir, write)


def check_model_tokenizer(init_model: str, tokenizer_dir: str, run_tokenizer) -> str:
    """Refuse an init model whose tokenizer (if it carries one) or vocabulary size differs from the run's."""
    from transformers import AutoConfig

    src = tokenizer_source_for_model(init_model)
    if src is not None:
        h = assert_same_tokenizer(load_tokenizer(src), run_tokenizer, "student init model",
                                  names=(str(init_model), str(tokenizer_dir)))
    else:
        h = vocab_hash(run_tokenizer)
    cfg = AutoConfig.from_pretrained(resolve_model_ref(init_model))
    vocab = getattr(cfg.get_text_config(), "vocab_size", None)
    if vocab is not None and vocab < len(run_tokenizer):
        raise ValueError(f"model {init_model!r} has vocab_size {vocab} < {len(run_tokenizer)} tokens of tokenizer "
                         f"{tokenizer_dir!r}: they were not built together")
    return h
