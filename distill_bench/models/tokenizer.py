"""Tokenizer for the embedded task, and the one prompt/response encoder every stage shares.

`encode_prompt_response` is the single place where a (prompt, response) pair becomes token ids and a completion mask:
the trainer, the KD logit cache and evaluation all call it, so loss-bearing positions line up everywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from distill_bench.atomic import write_dir_atomically
from distill_bench.refs import load_error, missing_local_path

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, SYSTEM]

# The assistant turn (content + eos) sits inside {% generation %} so TRL's assistant-only masks also work with it;
# eos closes every assistant turn, so a model trained on it learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT +
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None):
    """Train a BPE tokenizer (digits one per token, so arithmetic is learnable) and save it in HF format.

    Written atomically to ``out_dir`` (temp sibling dir + rename) when given. Returns a PreTrainedTokenizerFast.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if int(vocab_size) <= len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer.vocab_size={vocab_size} is too small: it must exceed the "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no training texts (empty dataset?)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Metaspace keeps whitespace (incl. newlines) recoverable on decode; Digits splits 123 -> 1 2 3.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                 additional_special_tokens=[USER, ASSISTANT, SYSTEM], padding_side="right",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        save_tokenizer(hf, out_dir)
    return hf


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> Path:
    """save_pretrained into a temporary sibling directory, then rename it over ``out_dir``."""
    return write_dir_atomically(out_dir, lambda tmp: tokenizer.save_pretrained(str(tmp)))


def tokenizer_ref(path: str | os.PathLike) -> str:
    """What to load for ``path``: a model dir holding only a ``model_ref.json`` pointer stands for the pointed-to
    model's tokenizer (its ``tokenizer`` key when the config named one, else ``name_or_path``); anything else as is."""
    p = Path(path).expanduser()
    pointer = p / "model_ref.json"
    if p.is_dir() and pointer.is_file() and not (p / "tokenizer_config.json").is_file():
        payload = json.loads(pointer.read_text())
        target = payload.get("tokenizer") or payload.get("name_or_path")
        if not target:
            raise ValueError(f"{pointer}: names no tokenizer and no name_or_path")
        return str(target)
    return str(path)


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer from a local dir, a model dir's ``model_ref.json`` pointer, or an HF id; clear errors naming
    the path (and, for a hub id that cannot be fetched, saying to point the config at a local copy)."""
    from transformers import AutoTokenizer

    p = tokenizer_ref(path)
    if missing_local_path(p):
        raise FileNotFoundError(f"tokenizer path {p!r} does not exist (hub ids look like 'owner/name')")
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as exc:
        raise load_error(p, "tokenizer", exc) from exc
    if tok.pad_token is None:  # many HF causal LMs ship without one; padding must never be a real token's loss
        tok.pad_token = tok.eos_token
    return tok


class MissingChatTemplateError(ValueError):
    """Every pipeline renders (prompt, response) through a chat template; plain concatenation is never a fallback."""


def require_chat_template(tokenizer, what: str = "") -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "?")
        raise MissingChatTemplateError(
            f"tokenizer {name!r}{' of ' + what if what else ''} has no chat template, and every pipeline renders "
            f"prompts and responses through one (never plain concatenation); point the model's 'tokenizer' config "
            f"key (teacher.tokenizer / students.<name>.tokenizer) at a tokenizer with the same vocabulary that has "
            f"one, e.g. the instruct variant's")


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # the template writes bos/special tokens itself, so the tokenizer must not add them again
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the user turn plus the assistant header (what generation starts from)."""
    return _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_prompt_response(tokenizer, prompt: str, response: str, max_length: int | None
                           ) -> dict[str, list[int]] | None:
    """Chat-templated ids and a completion mask (1 on the response tokens incl. the closing eos).

    Returns None when the sequence exceeds ``max_length`` (the caller counts drops); never truncates, so every kept
    example ends with its eos.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = _render(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                   add_generation_prompt=False)
    if full[:len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"chat template of tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} does not tokenize the prompt "
            "as a prefix of prompt+response; completion positions would be ambiguous")
    if len(full) <= len(prompt_ids):
        raise ValueError(f"empty completion for prompt {prompt[:60]!r}")
    if max_length is not None and len(full) > int(max_length):
        return None
    mask = [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))
    return {"input_ids": full, "completion_mask": mask}


def vocab_hash(tokenizer) -> str:
    """sha256 over the sorted vocabulary (added tokens included) and the special-token roles: tokenizer identity.
    KD compatibility compares the token -> id map only (models/vocab.py)."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        specials[name] = None if value is None else str(value)
    payload = json.dumps({"vocab": vocab, "special": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TokenizerMismatchError(ValueError):
    """Two artifacts of one run were built with different vocabularies."""


def assert_same_tokenizer(a, b, what: str, names: tuple[str, str] = ("a", "b")) -> str:
    """Raise TokenizerMismatchError naming both sides unless the vocabulary hashes match; return the hash.

    ``a``/``b`` are tokenizers or precomputed hash strings.
    """
    ha = a if isinstance(a, str) else vocab_hash(a)
    hb = b if isinstance(b, str) else vocab_hash(b)
    if ha != hb:
        na = names[0] if names[0] != "a" else getattr(a, "name_or_path", "a")
        nb = names[1] if names[1] != "b" else getattr(b, "name_or_path", "b")
        raise TokenizerMismatchError(
            f"tokenizer mismatch for {what}: {na!r} (vocab hash {ha[:12]}) differs from {nb!r} (vocab hash {hb[:12]}); "
            "teacher, students and caches of one run must share one vocabulary")
    return ha
