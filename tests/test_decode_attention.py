"""Grouped decode attention (graph decode loop) computes what transformers' SDPA path computes, reading K/V once."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill_bench.generation import decode_attention  # noqa: E402
from distill_bench.generation.static_decode import StaticDecoder  # noqa: E402


class _Attn(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("kernel", decode_attention.KERNELS)
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])   # GQA and plain multi-head
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_grouped_attention_equals_sdpa_attention_for_one_and_many_query_tokens(kernel, heads, kv_heads, mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    b, t, d = 3, 11, 16
    k = torch.randn(b, kv_heads, t, d, generator=g)
    v = torch.randn(b, kv_heads, t, d, generator=g)
    for q_len in (1, 4):   # decode step, and prefill (delegated to SDPA)
        q = torch.randn(b, heads, q_len, d, generator=g)
        allowed = torch.rand(b, 1, q_len, t, generator=g) > 0.3
        allowed[..., 0] = True                        # every row may attend somewhere
        mask = {"bool": allowed, "none": None,
                "float": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
        module = _Attn(heads // kv_heads)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, is_causal=False)
        function = {"sdpa": decode_attention.sdpa_grouped_attention,
                    "bmm": decode_attention.bmm_grouped_attention}[kernel]
        got, weights = function(module, q, k, v, mask, scaling=0.3, is_causal=False)
        assert weights is None and got.shape == want.shape == (b, q_len, heads, d)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _tiny_gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("attention,function", [("grouped", "sdpa_grouped_attention"),
                                                ("grouped_bmm", "bmm_grouped_attention")])
def test_graph_decode_uses_grouped_attention_gives_sdpa_greedy_tokens_and_restores_the_model(monkeypatch, attention,
                                                                                            function):
    model = _tiny_gqa_llama()
    ids = torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :2] = 0
    ids[mask == 0] = 0
    calls = []
    real = getattr(decode_attention, function)

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(decode_attention, function, spy)
    kw = dict(max_new_tokens=20, eos={96}, pad_id=0, greedy=True)
    want = StaticDecoder(model, 3, 64, compile=False, attention="model").generate(ids, mask, **kw)
    assert calls == []
    decoder = StaticDecoder(model, 3, 64, compile=False, attention=attention)
    got = decoder.generate(ids, mask, **kw)
    assert torch.equal(got, want)
    steps = decoder.timings[-1]["decode_steps"]
    assert steps > 0 and calls == [10, 10] + [1] * (2 * steps)   # prefill once per layer, then every decode step
    assert model.config._attn_implementation == "sdpa"


def test_models_with_other_attention_keep_it_and_bad_decode_attention_is_refused():
    model = _tiny_gqa_llama()
    model.set_attn_implementation("eager")
    with decode_attention.grouped_decode(model) as switched:
        assert switched and model.config._attn_implementation == decode_attention.NAMES["sdpa"]
    assert model.config._attn_implementation == "eager"
    model.config._attn_implementation = "flex_attention"   # not switched: its own kernels stay
    with decode_attention.grouped_decode(model) as switched:
        assert not switched and model.config._attn_implementation == "flex_attention"
    with pytest.raises(ValueError, match="decode attention"):
        StaticDecoder(model, 1, 64, compile=False, attention="flash")
