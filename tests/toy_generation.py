"""A tiny character-level chat tokenizer and random-init Llama, built in memory.

Test-only: the tests need a real HF tokenizer (with a chat template) and a real ``LlamaForCausalLM`` without
downloading anything; these are small enough to run in seconds on a 2-core CPU. Imported as ``from toy_generation
import ...`` (pytest puts tests/ on the path).
"""
from __future__ import annotations

import string

PAD, BOS, EOS, USER, ASSISTANT = "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"
SPECIALS = [PAD, BOS, EOS, USER, ASSISTANT]
CHARS = string.ascii_letters + string.digits + " .,:;!?+-*/=()$#\n'"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_toy_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: ids 0..4 are the specials, then one id per character."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.add_special_tokens(SPECIALS)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_toy_model(tokenizer, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                    intermediate_size: int = 64, seed: int = 0, max_position_embeddings: int = 512):
    """Random-init ``LlamaForCausalLM`` sized to ``tokenizer`` (fp32, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def build_chain_model(tokenizer, chain: dict[str, str], *, num_heads: int = 4):
    """A Llama whose greedy next token depends only on the current token, following ``chain``.

    Attention and MLP outputs are zeroed, embeddings are one-hot, and ``lm_head`` maps token ``a`` to
    ``chain[a]`` -- so the exact generated sequence (and where EOS falls) is known by hand. A token missing from
    ``chain`` gets all-zero logits, so greedy picks id 0 (the pad token) after it.
    """
    import torch

    vocab = len(tokenizer)
    hidden = -(-vocab // num_heads) * num_heads
    model = build_toy_model(tokenizer, hidden_size=hidden, num_layers=1, num_heads=num_heads,
                            intermediate_size=8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for src, dst in chain.items():
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(dst), tokenizer.convert_tokens_to_ids(src)] = 1.0
    return model


# prompts of varied lengths (so batches need padding) shared by the generation tests
TOY_PROMPTS = ["What is 2+3?", "hi", "a much longer prompt with quite a few characters in it", "x" * 30,
               "Compute 7*8.", "ok", "Sam has 4 apples and buys 9 more. How many?"]
