"""Test-only: tiny, download-free fixtures shared by the KD, DPO and cache tests."""
from __future__ import annotations

import random
from typing import Any

TEXTS = [f"what is {a} plus {b}? the answer is {a + b}." for a in range(12) for b in range(12)]


def tiny_tokenizer(vocab_size: int = 60, texts: list[str] | None = None):
    """A BPE tokenizer with the project's chat template, trained in memory (no download)."""
    from distill_bench.models.tokenizer import train_tokenizer

    return train_tokenizer(texts or TEXTS, vocab_size)


def tiny_llama(vocab_size: int, *, hidden: int = 16, layers: int = 1, heads: int = 2, seed: int = 0):
    """Random-init LlamaForCausalLM small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs of varying length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        terms = [rng.randint(0, 20) for _ in range(rng.randint(2, 4))]
        prompt = "what is " + " plus ".join(map(str, terms)) + "?"
        response = "the answer is " + " ".join(str(t) for t in terms[: rng.randint(1, len(terms))]) + \
            f". #### {sum(terms)}"
        out.append((prompt, response))
    return out


def toy_encoded(tokenizer, n: int, max_length: int = 128, seed: int = 0) -> list[dict[str, Any] | None]:
    from distill_bench.models.tokenizer import encode_prompt_response

    return [encode_prompt_response(tokenizer, p, r, max_length) for p, r in toy_pairs(n, seed)]
