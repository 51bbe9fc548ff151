"""Random-weight Hugging Face checkpoints of public architectures, with tokenizers of their real vocabulary size.

Why: the loading tests and the GPU benchmark must run the package's stages on the models a user names (Qwen2,
Llama, OLMo-2; tied and untied embeddings; padded embedding matrices; tokenizers with and without a pad token or a
chat template) on machines with no network and no weights. Everything here is written in code from the models'
published configs.

The tokenizers are honest stand-ins, not copies: the ordinary tokens are a byte-level BPE trained in seconds on the
given text, the id space is filled up to the real tokenizer's length with tokens no merge can produce (so a model's
softmax, top-k and the KD cache's id packing run over the real vocabulary size), and the special tokens sit at the
real tokenizer's ids. Token counts of a text therefore differ from the real tokenizer's; per-token costs do not.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OLMO2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                  "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(frozen=True)
class TokenizerFamily:
    size: int                                # len(tokenizer) of the real one
    specials: dict[str, int]                 # special token -> its id in the real tokenizer
    eos: str
    pad: str | None
    bos: str | None
    chat_template: str | None
    extra_specials: tuple[str, ...] = ()     # role markers the template writes (added as special tokens)


TOKENIZERS: dict[str, TokenizerFamily] = {
    # Qwen2.5 (all sizes, base and instruct): 151,643 BPE tokens, then <|endoftext|>, <|im_start|>, <|im_end|> ...
    "qwen2.5": TokenizerFamily(size=151665, specials={"<|endoftext|>": 151643, "<|im_start|>": 151644,
                                                      "<|im_end|>": 151645},
                               eos="<|im_end|>", pad="<|endoftext|>", bos=None, chat_template=CHATML),
    # SmolLM2: 49,152 entries, the specials first
    "smollm2": TokenizerFamily(size=49152, specials={"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
                               eos="<|im_end|>", pad="<|im_end|>", bos="<|im_start|>", chat_template=CHATML),
    # OLMo-2 (dolma2, cl100k-based): <|endoftext|> at 100257, <|pad|> at 100277
    "olmo2": TokenizerFamily(size=100278, specials={"<|endoftext|>": 100257, "<|user|>": 100264,
                                                    "<|assistant|>": 100265, "<|pad|>": 100277},
                             eos="<|endoftext|>", pad="<|pad|>", bos="<|endoftext|>", chat_template=OLMO2_TEMPLATE),
}


@dataclass(frozen=True)
class Architecture:
    model_type: str                          # transformers model_type: llama, qwen2, olmo2
    tokenizer: str                           # key of TOKENIZERS
    config: dict[str, Any] = field(default_factory=dict)


# the published config.json values that shape compute and memory (hub ids in the comments)
ARCHITECTURES: dict[str, Architecture] = {
    "qwen2.5-7b-instruct": Architecture("qwen2", "qwen2.5", dict(  # Qwen/Qwen2.5-7B-Instruct
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "qwen2.5-1.5b-instruct": Architecture("qwen2", "qwen2.5", dict(  # Qwen/Qwen2.5-1.5B-Instruct
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "qwen2.5-0.5b": Architecture("qwen2", "qwen2.5", dict(  # Qwen/Qwen2.5-0.5B
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "smollm2-360m-instruct": Architecture("llama", "smollm2", dict(  # HuggingFaceTB/SmolLM2-360M-Instruct
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "olmo2-1b": Architecture("olmo2", "olmo2", dict(  # allenai/OLMo-2-0425-1B
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=100352, tie_word_embeddings=False, rope_theta=500000.0,
        max_position_embeddings=4096, rms_norm_eps=1e-6)),
}

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _filler(i: int) -> str:
    """A byte-level token no merge produces ('Ġ' + letters): decodes to text, never appears in an encoding."""
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(97 + r) + letters
    return "\u0120\u00ff" + letters


def build_tokenizer(family: str, texts: Iterable[str], *, size: int | None = None, bpe_vocab: int = 2000,
                    pad: bool = True, chat_template: bool = True, out_dir: str | os.PathLike | None = None):
    """A PreTrainedTokenizerFast with ``family``'s special tokens, ids and length (or ``size``, for tiny tests:
    specials keep their position at the start or the end); BPE merges trained on ``texts``. ``pad``/``chat_template``
    False drop the pad token / the template, as many base checkpoints ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = TOKENIZERS[family]
    size = int(size or fam.size)
    specials = dict(fam.specials)
    if size != fam.size:  # keep the layout: specials at the end stay at the end, at the start stay at the start
        at_end = min(specials.values()) > fam.size // 2
        specials = {t: (size - (fam.size - i) if at_end else i) for t, i in specials.items()}
    trainer = trainers.BpeTrainer(vocab_size=max(300, min(bpe_vocab, size - len(specials))), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.train_from_iterator([t for t in texts if t], trainer=trainer)
    trained = json.loads(base.to_str())["model"]
    ordinary = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    free = [i for i in range(size) if i not in set(specials.values())]
    if len(ordinary) > len(free):
        ordinary = ordinary[:len(free)]
    vocab = {tok: free[n] for n, (tok, _) in enumerate(ordinary)}
    for n, i in enumerate(free[len(ordinary):]):
        vocab[_filler(n)] = i
    vocab.update(specials)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and "".join(m) in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    kwargs = {"eos_token": fam.eos}
    if fam.bos:
        kwargs["bos_token"] = fam.bos
    if pad and fam.pad:
        kwargs["pad_token"] = fam.pad
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    if chat_template and fam.chat_template:
        hf.chat_template = fam.chat_template
    if len(hf) != size:
        raise AssertionError(f"built tokenizer has {len(hf)} entries, wanted {size}")
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def model_config(name: str, *, tiny: bool = False, tie: bool | None = None, vocab_size: int | None = None):
    """The transformers config of architecture ``name`` (``tiny``: 2 layers of width 32, same type and layout)."""
    from transformers import AutoConfig

    arch = ARCHITECTURES[name]
    cfg = dict(arch.config)
    if tiny:
        cfg.update(TINY)
        cfg["max_position_embeddings"] = 2048
    if tie is not None:
        cfg["tie_word_embeddings"] = bool(tie)
    if vocab_size is not None:
        cfg["vocab_size"] = int(vocab_size)
    return AutoConfig.for_model(arch.model_type, **cfg)


def save_random_checkpoint(name: str, out_dir: str | os.PathLike, tokenizer, *, tiny: bool = False,
                           tie: bool | None = None, vocab_size: int | None = None, seed: int = 0,
                           dtype: str = "float32", device: str | None = None) -> Path:
    """Initialise ``name`` with random weights (its own init scheme) and save it with ``tokenizer`` in HF format.

    ``vocab_size`` = rows of the embedding matrix (default: the published config's, which may exceed the
    tokenizer: padded rows, as Qwen2.5 ships them)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(name, tiny=tiny, tie=tie, vocab_size=vocab_size)
    if cfg.vocab_size < len(tokenizer):
        raise ValueError(f"{name}: {cfg.vocab_size} embedding rows < {len(tokenizer)} tokenizer entries")
    for role in ("eos", "bos", "pad"):
        setattr(cfg, f"{role}_token_id", getattr(tokenizer, f"{role}_token_id"))
    torch_dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del model
    return out
