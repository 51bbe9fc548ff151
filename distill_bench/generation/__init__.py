"""Batched generation shared by synthetic data, DPO sampling and eval (API: docs/ARCHITECTURE.md).

``generate(model_or_dir, tokenizer, prompts, settings, on_batch=None)`` applies the tokenizer's chat template to
each plain user prompt and returns one ``GenerationResult`` per (prompt, sample) in prompt order. Backends: ``hf``
(left-padded length-sorted batches), ``vllm`` (optional extra, GPU), ``auto`` (vllm when importable and a GPU is
present, else hf). ``on_batch(n_generated_tokens, elapsed_s)`` is called after each batch so a stage can meter
steady-state throughput. Prompts over the length limit are truncated or dropped per ``prompt_overflow`` and
flagged on their results (``summarize`` totals them).
"""
from __future__ import annotations

from typing import Callable

from distill_bench.generation.settings import GenerationResult, GenerationSettings, summarize

__all__ = ["GenerationSettings", "GenerationResult", "generate", "resolve_backend", "summarize"]


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``vllm`` when vllm imports and CUDA is available, else ``hf``."""
    if backend != "auto":
        return backend
    from distill_bench.generation.vllm_backend import vllm_available

    if vllm_available():
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "hf"


def generate(model_or_dir, tokenizer, prompts: list[str], settings: GenerationSettings | None = None,
             on_batch: Callable[[int, float], None] | None = None) -> list[GenerationResult]:
    settings = settings or GenerationSettings()
    if not isinstance(settings, GenerationSettings):
        settings = GenerationSettings.from_dict(settings)
    from distill_bench.generation.prompts import load_tokenizer

    backend = resolve_backend(settings.backend)
    if backend == "vllm":
        from distill_bench.generation.vllm_backend import generate_vllm

        return generate_vllm(model_or_dir, tokenizer, prompts, settings, on_batch)
    from distill_bench.generation.hf_backend import generate_hf

    return generate_hf(model_or_dir, load_tokenizer(tokenizer), list(prompts), settings, on_batch)
