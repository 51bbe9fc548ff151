"""Static-cache decode paths (hf_decode graph / hf_static) give the eager backend's greedy tokens and exact counts."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from distill_bench.generation import GenerationSettings, generate  # noqa: E402
from distill_bench.generation.static_decode import LEN_BUCKET, cache_length  # noqa: E402
from toy_generation import TOY_PROMPTS, build_chain_model  # noqa: E402

PROMPTS = TOY_PROMPTS


@pytest.mark.parametrize("mode", ["graph", "hf_static"])
@pytest.mark.parametrize("batch_size", [64, 3])  # 3: last batch is padded with filler rows to the fixed row count
def test_static_modes_greedy_equal_eager(tok, model, mode, batch_size):
    ref = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=batch_size))
    got = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=batch_size,
                                                           hf_decode=mode))
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert [(r.prompt_index, r.generated_tokens, r.prompt_tokens) for r in got] == \
        [(r.prompt_index, r.generated_tokens, r.prompt_tokens) for r in ref]


@pytest.mark.parametrize("mode", ["graph", "hf_static"])
def test_static_modes_count_tokens_up_to_eos_and_stop_early(tok, mode):
    chain = build_chain_model(tok, {"<|assistant|>": "a", "a": "b", "b": "c", "c": "</s>"})
    # 40 new tokens allowed, EOS after 4: the loop's coarse all-finished check must not add padding tokens
    results = generate(chain, tok, ["hi", "a longer prompt"],
                       GenerationSettings(max_new_tokens=40, batch_size=8, hf_decode=mode))
    assert [(r.text, r.generated_tokens, r.finished) for r in results] == [("abc", 4, True)] * 2
    cut = generate(chain, tok, ["hi"], GenerationSettings(max_new_tokens=2, hf_decode=mode))[0]
    assert (cut.text, cut.generated_tokens, cut.finished) == ("ab", 2, False)


def greedy_by_prompt(model, tok, mode: str, **kw) -> tuple[dict, dict]:
    """Greedy new tokens per prompt of PROMPTS in batches of 3 (sorted, so batches have different widths), and the
    decode stats."""
    from distill_bench.generation.hf_backend import generate_ids

    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) > 2
    got, stats = {}, {}

    def on_batch(rows, new, _elapsed):
        got.update({k: samples[0] for k, samples in zip(rows, new)})

    generate_ids(model, prompt_ids, GenerationSettings(max_new_tokens=10, batch_size=3, hf_decode=mode),
                 {tok.eos_token_id}, tok.pad_token_id, on_batch, stats=stats, **kw)
    return got, stats


def gqa_olmo2(tok):
    """A tiny OLMo-2 (the study's architecture: q/k norms) with grouped-query attention, 4 heads on 2 K/V heads."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(5)
    return Olmo2ForCausalLM(Olmo2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).eval()


def test_compiled_prefill_gives_the_eager_greedy_tokens_over_batches_of_different_widths(tok, model):
    """The prefill compiled with dynamic shapes (one graph for every prompt width; compiled on CPU too) decodes what
    eager generate decodes; batches of 3 sorted prompts have different widths, so the graph is reused across them."""
    from torch._dynamo.utils import counters

    ref, _ = greedy_by_prompt(model, tok, "eager")
    compiled_before = counters["stats"]["unique_graphs"]
    got, stats = greedy_by_prompt(model, tok, "graph", prefill="compiled")
    assert counters["stats"]["unique_graphs"] > compiled_before, "the prefill was traced and compiled, not run eagerly"
    assert stats["prefill"] == "compiled" and len(stats["batches"]) > 1
    assert len({b["width"] for b in stats["batches"]}) > 1
    assert got == ref


@pytest.mark.parametrize("arch", ["llama", "olmo2_gqa"])
def test_packed_prefill_gives_the_eager_greedy_tokens_over_batches_of_different_widths(tok, model, arch):
    net = model if arch == "llama" else gqa_olmo2(tok)
    ref, _ = greedy_by_prompt(net, tok, "eager")
    got, stats = greedy_by_prompt(net, tok, "graph", prefill="packed")
    assert stats["prefill"] == "packed" and len({b["width"] for b in stats["batches"]}) > 1
    assert got == ref
    assert net.config._attn_implementation == "sdpa", "the model's own attention is restored after the prefill"


def test_packed_prefill_fills_the_static_cache_as_the_padded_prefill_does_at_every_prompt_position(tok):
    import torch
    from transformers import StaticCache

    from distill_bench.generation.packed_prefill import packed_prefill
    from distill_bench.generation.static_decode import left_padded, position_ids

    net = gqa_olmo2(tok)
    ids, mask = left_padded([tok(p)["input_ids"] for p in PROMPTS[:3]], tok.pad_token_id)
    width = ids.shape[1]
    assert not mask.all(), "prompts of different lengths: the batch has pads"
    pos = position_ids(mask)
    padded, packed = (StaticCache(config=net.config, max_cache_len=width + 8) for _ in range(2))
    with torch.no_grad():
        want = net(input_ids=ids, attention_mask=mask, position_ids=pos, cache=padded,
                   use_cache=True).logits[:, -1]
    got = packed_prefill(net, ids, mask, pos, packed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    keep = mask.bool()
    for a, b in zip(padded.layers, packed.layers):
        assert int(b.cumulative_length) == int(a.cumulative_length) == width
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            x, y = x[:, :, :width].transpose(1, 2), y[:, :, :width].transpose(1, 2)   # [rows, width, Hkv, D]
            torch.testing.assert_close(y[keep], x[keep], rtol=1e-4, atol=1e-5)
            assert not y[~keep].any(), "pad slots stay empty"
        assert not b.keys[:, :, width:].any() and not b.values[:, :, width:].any()


def test_prefill_auto_is_packed_for_plain_causal_half_precision_models_on_cuda_only(model, monkeypatch):
    import copy
    import types

    import torch

    from transformers import GPT2Config

    from distill_bench.generation.hf_backend import resolve_prefill
    from distill_bench.train import varlen

    cuda, cpu = types.SimpleNamespace(type="cuda"), types.SimpleNamespace(type="cpu")
    auto, eager = GenerationSettings(), GenerationSettings(hf_prefill="eager")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert auto.hf_prefill == "auto"
    assert resolve_prefill(auto, bf16, cpu) == "eager"
    monkeypatch.setattr(varlen, "available", lambda: True)   # the kernel exists where CUDA does
    assert resolve_prefill(auto, bf16, cuda) == "packed"
    assert resolve_prefill(auto, model, cuda) == "eager", "an fp32 model would attend in bf16 in the flash kernel"
    assert resolve_prefill(eager, bf16, cuda) == "eager"
    other = types.SimpleNamespace(config=GPT2Config(), dtype=torch.bfloat16)   # not a plain-causal llama/olmo/...
    assert resolve_prefill(auto, other, cuda) == "eager"
    with pytest.raises(ValueError, match="synthetic.*hf_prefill"):
        GenerationSettings.from_dict({"hf_prefill": "padded"}, where="synthetic")


def test_packed_prefill_set_in_the_settings_decodes_the_eager_greedy_tokens(tok, model):
    ref = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=3))
    got = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=3, hf_decode="graph",
                                                           hf_prefill="packed"))
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]


def test_unknown_prefill_mode_is_refused_by_name(model):
    from distill_bench.generation.static_decode import StaticDecoder

    with pytest.raises(ValueError, match="prefill must be one of eager, packed, compiled"):
        StaticDecoder(model, 2, 64, compile=False, prefill="cuda")


def test_graph_sampling_is_seeded_with_num_samples(tok, model):
    s = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, num_samples=3, seed=7, batch_size=6,
                           hf_decode="graph")
    a = generate(model, tok, PROMPTS[:3], s)
    assert [(r.prompt_index, r.sample_index) for r in a] == [(i, j) for i in range(3) for j in range(3)]
    assert [r.token_ids for r in a] == [r.token_ids for r in generate(model, tok, PROMPTS[:3], s)]
    assert len({r.token_ids for r in a}) > 3


def test_auto_is_eager_on_cpu_and_bad_mode_names_the_key(tok, model):
    from distill_bench.generation.hf_backend import resolve_decode

    assert GenerationSettings().hf_decode == "auto"
    assert resolve_decode(GenerationSettings(), model.device) == "eager"
    with pytest.raises(ValueError, match="eval.*hf_decode"):
        GenerationSettings.from_dict({"hf_decode": "cuda"}, where="eval")
    with pytest.raises(ValueError, match="continuous_batching"):
        generate(model, tok, ["hi"], GenerationSettings(continuous_batching=True, hf_decode="graph"))


def test_cache_length_is_bucketed_and_fits_prompt_plus_new_tokens():
    assert cache_length(1, 1) == LEN_BUCKET
    assert cache_length(500, 128) == 640 and cache_length(513, 128) == 704


def test_fused_elementwise_computes_the_models_own_norms_mlps_and_rotary_and_restores_them(tok):
    """The fused prefill functions (compiled; on CPU here) give the model's own logits, patch every RMSNorm (q/k norms,
    both post-norms per layer, the final norm), every SwiGLU MLP and the modelling file's rotary function, and leave
    no patched forward or function behind."""
    import torch

    from transformers.models.olmo2 import modeling_olmo2

    from distill_bench.generation.packed_prefill import fused_elementwise

    own_rotary = modeling_olmo2.apply_rotary_pos_emb
    net = gqa_olmo2(tok)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        want = net(input_ids=ids).logits
        with fused_elementwise(net) as patched:
            got = net(input_ids=ids).logits
    layers = net.config.num_hidden_layers
    assert patched == layers * 4 + 1 + layers + 1   # norms, the final norm, MLPs, the rotary function
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in net.modules())
    assert modeling_olmo2.apply_rotary_pos_emb is own_rotary


@pytest.mark.parametrize("norm_class", ["Olmo2RMSNorm", "LlamaRMSNorm"])
def test_fused_rms_norm_rounds_where_the_models_own_norm_does_in_bf16(norm_class, monkeypatch):
    """OLMo-2 applies the norm's weight in fp32 and rounds once; Llama rounds, then applies the weight in bf16. The
    fused norm follows each model's order: bitwise equal to the module's forward almost everywhere (a reduction
    in another order may move a value by one rounding step), far more often than the other order manages."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from distill_bench.generation.packed_prefill import RMS_NORMS, fused_elementwise

    torch.manual_seed(0)
    norm = {"Olmo2RMSNorm": Olmo2RMSNorm, "LlamaRMSNorm": LlamaRMSNorm}[norm_class](256).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256) * 3 + 0.1)
        x = torch.randn(64, 256).to(torch.bfloat16)
        want = norm(x)
        with fused_elementwise(norm) as patched:
            got = norm(x)
        other_order = {"after_weight": "before_weight", "before_weight": "after_weight"}[RMS_NORMS[norm_class]]
        monkeypatch.setitem(RMS_NORMS, norm_class, other_order)
        with fused_elementwise(norm):
            swapped = norm(x)
    assert patched == 1 and got.dtype == want.dtype == torch.bfloat16
    same, same_swapped = (float((y == want).float().mean()) for y in (got, swapped))
    assert same > 0.99 and same_swapped < 0.9, (same, same_swapped)


def test_packed_prefill_launches_the_varlen_kernel_for_its_longest_prompt_and_decodes_the_eager_tokens(
        tok, monkeypatch):
    """Through the varlen path (here a CPU stand-in for the flash kernel, causal inside each prompt): the kernel is
    told the batch's longest prompt, not the packed row's length (which would launch work blocks for thousands of
    empty positions per prompt), and greedy decoding still gives eager generate's tokens."""
    import torch

    from distill_bench.generation import packed_prefill as pp
    from distill_bench.train import varlen

    longest_told, row_lengths = [], []

    def flash_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None):
        assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k
        longest_told.append(max_q)
        row_lengths.append(q.shape[0])
        bounds = cu_q.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            scale=scale).transpose(0, 1) for a, b in zip(bounds, bounds[1:])])

    net = gqa_olmo2(tok)
    ref, _ = greedy_by_prompt(net, tok, "eager")
    monkeypatch.setattr(pp, "_varlen_runs", lambda query: True)
    monkeypatch.setattr(varlen, "_kernel", lambda: flash_stand_in)
    got, stats = greedy_by_prompt(net, tok, "graph", prefill="packed")
    assert got == ref
    widths = [b["width"] for b in stats["batches"]]
    layers = net.config.num_hidden_layers
    assert longest_told == [w for w in widths for _ in range(layers)]
    assert all(told < length for told, length in zip(longest_told, row_lengths)), "several prompts per row"


@pytest.mark.parametrize("family", ["olmo2", "llama"])
def test_fused_rotary_embedding_is_the_models_own_function_bitwise_in_bf16(family):
    """The compiled rotary embedding is the modelling file's own function, rounding where it rounds: bitwise equal
    to it on bf16 q/k in the prefill's layout (heads transposed over the packed row)."""
    import importlib

    import torch

    from distill_bench.generation.packed_prefill import _compiled

    own = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 37, 4, 2, 16
    q = torch.randn(1, tokens, heads, dim).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, tokens, kv_heads, dim).to(torch.bfloat16).transpose(1, 2)
    angles = torch.arange(tokens)[:, None] * torch.rand(dim // 2)[None]
    cos, sin = (f(torch.cat([angles, angles], -1))[None].to(torch.bfloat16) for f in (torch.cos, torch.sin))
    for want, got in zip(own(q, k, cos, sin), _compiled(own)(q, k, cos, sin)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_fused_packed_prefill_decodes_the_eager_tokens_and_never_recompiles_the_decode_step(tok, monkeypatch):
    """The fused norms, rotary and SwiGLU (switched on here on CPU) leave the decode step's compiled graph valid:
    the forwards and functions they swap are restored before it runs, so batches after the first compile nothing
    (their prompt widths differ: the fused functions' graphs take any length)."""
    from torch._dynamo.utils import counters

    from distill_bench.generation import packed_prefill as pp
    from distill_bench.generation import static_decode

    net = gqa_olmo2(tok)
    ref, _ = greedy_by_prompt(net, tok, "eager")
    graphs_at_prefill = []

    def counting_prefill(*args, **kwargs):
        graphs_at_prefill.append(counters["stats"]["unique_graphs"])
        return pp.packed_prefill(*args, **kwargs)

    monkeypatch.setattr(pp, "_fuses", lambda ids: True)
    monkeypatch.setattr(static_decode, "packed_prefill", counting_prefill)
    got, stats = greedy_by_prompt(net, tok, "graph", prefill="packed")
    assert got == ref and len(graphs_at_prefill) == len(stats["batches"]) > 2
    assert len({b["width"] for b in stats["batches"]}) > 1
    assert counters["stats"]["unique_graphs"] == graphs_at_prefill[1], "a batch after the first compiled a graph"


def test_decode_step_is_compiled_in_the_configured_mode(model, monkeypatch):
    from distill_bench.generation import static_decode

    modes = []
    monkeypatch.setattr(static_decode.torch, "compile", lambda fn, **kw: modes.append(kw["mode"]) or fn)
    static_decode.StaticDecoder(model, 2, 64, compile=True)
    monkeypatch.setattr(static_decode, "DECODE_COMPILE_MODE", "max-autotune")
    static_decode.StaticDecoder(model, 2, 64, compile=True)
    assert modes == ["reduce-overhead", "max-autotune"]
