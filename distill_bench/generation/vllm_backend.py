"""vLLM backend (optional extra ``distill-bench[vllm]``, GPU only): ``vllm.LLM`` + ``SamplingParams``.

We apply the chat template and the prompt-length policy ourselves and hand vLLM token ids, so the hf and vllm
backends see byte-identical prompts and ``prompt_tokens`` is exact. vLLM schedules its own continuous batches, so
``batch_size`` is not used and ``on_batch`` is called once for the whole request set.
"""
from __future__ import annotations

import importlib
import os
import time

from distill_bench.generation.prompts import load_tokenizer, prepare
from distill_bench.generation.settings import GenerationResult, GenerationSettings
from distill_bench.models.build import resolve_model_ref
from distill_bench.models.tokenizer import tokenizer_ref

MISSING = ("backend 'vllm' requested but vllm is not installed: pip install 'distill-bench[vllm]' (needs a CUDA "
           "GPU), or set synthetic.backend: hf (or auto) in the workflow config")


def vllm_available() -> bool:
    try:
        importlib.import_module("vllm")
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise RuntimeError(f"{MISSING} ({e})") from None


def _path_of(obj, what: str) -> str:
    """What vLLM loads: a directory or hub id; a results dir holding a ``model_ref.json`` pointer stands for the
    model it names (``what`` = "model") or that model's configured tokenizer ("tokenizer")."""
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        path = os.fsdecode(os.fspath(obj))
        if os.path.isfile(os.path.join(path, "model_ref.json")):
            return tokenizer_ref(path) if what == "tokenizer" else resolve_model_ref(path)
        return path
    path = getattr(obj, "name_or_path", None)
    if path and os.path.isdir(path):
        return path
    raise TypeError(f"backend 'vllm' needs the {what} as a directory or HF id (vLLM loads it itself), "
                    f"got an in-memory {type(obj).__name__} without a saved directory")


def sampling_params(vllm, settings: GenerationSettings):
    return vllm.SamplingParams(n=settings.num_samples, temperature=float(settings.temperature),
                               top_p=float(settings.top_p), max_tokens=settings.max_new_tokens,
                               seed=settings.seed)


def generate_vllm(model_or_dir, tokenizer, prompts: list[str], settings: GenerationSettings,
                  on_batch=None) -> list[GenerationResult]:
    vllm = import_vllm()
    model_path = _path_of(model_or_dir, "model")
    tok_path = _path_of(tokenizer, "tokenizer")
    tok = load_tokenizer(tokenizer)
    llm = vllm.LLM(model=model_path, tokenizer=tok_path, seed=settings.seed, dtype=settings.dtype)
    context = None
    try:
        context = llm.llm_engine.model_config.max_model_len
    except AttributeError:
        pass
    prepared = prepare(tok, list(prompts), settings, context)
    live = [p for p in prepared if p.ids is not None]
    params = sampling_params(vllm, settings)
    t0 = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p.ids} for p in live], params, use_tqdm=False) if live else []
    elapsed = time.perf_counter() - t0
    if len(outputs) != len(live):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(live)} prompts")
    results: dict[tuple[int, int], GenerationResult] = {}
    for p in prepared:
        if p.ids is None:
            for s in range(settings.num_samples):
                results[(p.index, s)] = GenerationResult(p.index, s, "", p.original_tokens, 0, False, dropped=True)
    total = 0
    for p, request_output in zip(live, outputs):  # vLLM returns outputs in submission order
        completions = sorted(request_output.outputs, key=lambda c: c.index)
        if len(completions) != settings.num_samples:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {p.index}, "
                               f"expected {settings.num_samples}")
        prompt_ids = request_output.prompt_token_ids
        for s, c in enumerate(completions):
            ids = tuple(int(t) for t in c.token_ids)
            results[(p.index, s)] = GenerationResult(
                prompt_index=p.index, sample_index=s, text=c.text,
                prompt_tokens=len(prompt_ids) if prompt_ids is not None else len(p.ids),
                generated_tokens=len(ids), finished=c.finish_reason == "stop",
                truncated_tokens=p.truncated_tokens, token_ids=ids)
            total += len(ids)
    if on_batch is not None:
        on_batch(total, elapsed)
    return [results[(p.index, s)] for p in prepared for s in range(settings.num_samples)]
