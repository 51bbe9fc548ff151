"""Chat templating and the prompt-length policy, shared by the hf and vllm backends so both see the same ids."""
from __future__ import annotations

from dataclasses import dataclass

from distill_bench.generation.settings import GenerationSettings
from distill_bench.models.tokenizer import load_tokenizer as load_from_path
from distill_bench.models.tokenizer import require_chat_template


@dataclass(frozen=True)
class PreparedPrompt:
    index: int
    ids: list[int] | None  # None: dropped
    truncated_tokens: int = 0
    original_tokens: int = 0


def load_tokenizer(tokenizer):
    """Accept a tokenizer object or a directory / HF id; the tokenizer must carry a chat template."""
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        tokenizer = load_from_path(tokenizer)
    require_chat_template(tokenizer, "the generating model")
    return tokenizer


def eos_ids(tokenizer, model=None) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS plus the model generation config's EOS id(s)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


def encode_chat(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as a single user turn, with the generation prompt appended, as token ids."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    # the template already carries BOS etc.; adding special tokens again would double them
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def prompt_limit(settings: GenerationSettings, context_length: int | None) -> int | None:
    """Longest allowed templated prompt: ``max_prompt_tokens`` or the context left after ``max_new_tokens``."""
    limit = settings.max_prompt_tokens
    if context_length:
        room = int(context_length) - settings.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the "
                             f"model's context of {context_length} tokens")
        limit = room if limit is None else min(limit, room)
    return limit


def prepare(tokenizer, prompts: list[str], settings: GenerationSettings,
            context_length: int | None) -> list[PreparedPrompt]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings (plain user turns)")
    limit = prompt_limit(settings, context_length)
    out = []
    for i, ids in enumerate(encode_chat(tokenizer, prompts)):
        n = len(ids)
        if limit is None or n <= limit:
            out.append(PreparedPrompt(i, list(ids), 0, n))
        elif settings.prompt_overflow == "drop":
            out.append(PreparedPrompt(i, None, 0, n))
        else:
            out.append(PreparedPrompt(i, list(ids[n - limit:]), n - limit, n))
    return out
