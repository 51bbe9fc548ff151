"""Helpers the stage tests share: a checking stand-in for the energy meter, and the tiny arithmetic data, tokenizer
and model sizes (a few thousand parameters, CPU, seconds). Test modules import them with ``from conftest import``."""
from __future__ import annotations

import json
import random

import pytest

TINY_ARCH = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


class FakeMeter:
    """Collects what a stage reports to its ``StageMeter`` and refuses what the stage JSON could not hold: token
    counts must be ints >= 0, recorded values JSON without NaN/inf. ``records`` is ``metrics`` (both names read)."""

    def __init__(self):
        self.tokens, self.primary, self.steady_marks = {}, None, 0
        self.metrics = self.records = {}

    def add_tokens(self, kind, n):
        assert isinstance(n, int) and n >= 0
        self.tokens[kind] = self.tokens.get(kind, 0) + n

    def set_primary_tokens(self, kind):
        self.primary = kind

    def record(self, key, value):
        json.dumps(value, allow_nan=False)
        self.metrics[key] = value

    def mark_steady_state(self):
        self.steady_marks += 1


def arith_pairs(n, seed=0):
    """``n`` (prompt, response) word problems with a GSM8K-style ``#### answer`` line."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append((f"Tom has {a} apples and buys {b} more. How many now?",
                    f"{a} + {b} = {a + b}\n#### {a + b}"))
    return out


def save_pairs_dataset(path, pairs):
    """A DatasetDict in the common record schema: ``pairs`` as train, the first five again as eval."""
    from datasets import Dataset, DatasetDict

    def split(name, items):
        return Dataset.from_dict({"id": [f"t-{name}-{i}" for i in range(len(items))],
                                  "prompt": [p for p, _ in items], "response": [r for _, r in items],
                                  "answer": [r.split("#### ")[-1] for _, r in items],
                                  "source": ["embedded"] * len(items)})

    DatasetDict({"train": split("train", pairs), "eval": split("eval", pairs[:5])}).save_to_disk(str(path))
    return path


def train_arith_tokenizer(out_dir, n_pairs, vocab_size):
    """Train the embedded tokenizer on ``n_pairs`` arithmetic pairs into ``out_dir``; returns the dir."""
    from distill_bench.models.tokenizer import train_tokenizer

    train_tokenizer([t for p, r in arith_pairs(n_pairs) for t in (p, r)], vocab_size, out_dir)
    return out_dir


def save_tiny_model(tok, out_dir, seed=0):
    """A fresh ``TINY_ARCH`` Llama with ``tok``'s vocabulary, saved (with the tokenizer) to ``out_dir``."""
    from distill_bench.models.build import init_model_from_arch, save_model_dir

    return save_model_dir(init_model_from_arch(TINY_ARCH, tok, seed), out_dir, tok)


@pytest.fixture(scope="module")
def tok():
    """The generation tests' character-level chat tokenizer (tests/toy_generation.py)."""
    from toy_generation import build_toy_tokenizer

    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama over ``tok`` (seed 3); test modules with their own ``tok``/``model`` override these."""
    from toy_generation import build_toy_model

    return build_toy_model(tok, seed=3)


@pytest.fixture
def decode_modes(monkeypatch):
    """The ``hf_decode`` of every batch the chunked generation loop decodes (and in ``.prefill`` its
    ``hf_prefill``); each batch itself decodes eagerly, fast on the CPU whatever mode was asked for."""
    import dataclasses

    from distill_bench.generation import chunked

    class Seen(list):
        prefill: list

    real, seen = chunked.generate, Seen()
    seen.prefill = []

    def spy(model, tok, prompts, settings, on_batch=None):
        seen.append(settings.hf_decode)
        seen.prefill.append(settings.hf_prefill)
        return real(model, tok, prompts, dataclasses.replace(settings, hf_decode="eager"), on_batch=on_batch)

    monkeypatch.setattr(chunked, "generate", spy)
    return seen
