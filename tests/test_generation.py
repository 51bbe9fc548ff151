"""Generation backends: batched == one-by-one greedy, exact token counts, order, overflow, vLLM boundary."""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from distill_bench.generation import GenerationSettings, generate, resolve_backend, summarize  # noqa: E402
from distill_bench.generation.prompts import encode_chat  # noqa: E402
from toy_generation import TOY_PROMPTS, build_chain_model  # noqa: E402

PROMPTS = TOY_PROMPTS


def test_batched_left_padded_greedy_equals_one_by_one(tok, model):
    settings = GenerationSettings(max_new_tokens=10, batch_size=64)
    batched = generate(model, tok, PROMPTS, settings)
    in_pairs = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=10, batch_size=2))
    single = [generate(model, tok, [p], GenerationSettings(max_new_tokens=10, batch_size=1))[0] for p in PROMPTS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single] == [r.token_ids for r in in_pairs]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.prompt_tokens for r in batched] == [len(ids) for ids in encode_chat(tok, PROMPTS)]


def test_results_come_back_in_prompt_order_despite_length_sorting(tok, model):
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    forward = generate(model, tok, PROMPTS, settings)
    backward = generate(model, tok, PROMPTS[::-1], settings)
    assert [r.prompt_index for r in forward] == list(range(len(PROMPTS)))
    assert [r.token_ids for r in backward] == [r.token_ids for r in forward][::-1]


def test_token_counts_exact_on_hand_checked_chain_model(tok):
    # greedy next token depends only on the current one: <|assistant|> -> a -> b -> c -> </s>
    chain = build_chain_model(tok, {"<|assistant|>": "a", "a": "b", "b": "c", "c": "</s>"})
    results = generate(chain, tok, ["hi", "a longer prompt"], GenerationSettings(max_new_tokens=10, batch_size=8))
    # "<s>" "<|user|>" "h" "i" "<|assistant|>" = 5 prompt tokens; the 2nd prompt is padded to 18 in the batch
    assert [r.prompt_tokens for r in results] == [5, 18]
    for r in results:
        assert (r.text, r.generated_tokens, r.finished) == ("abc", 4, True)  # a, b, c, EOS; no padding
        assert r.token_ids == tuple(tok.convert_tokens_to_ids(["a", "b", "c", "</s>"]))
    cut = generate(chain, tok, ["hi"], GenerationSettings(max_new_tokens=2))[0]
    assert (cut.text, cut.generated_tokens, cut.finished) == ("ab", 2, False)
    at_limit = generate(chain, tok, ["hi"], GenerationSettings(max_new_tokens=4))[0]
    assert (at_limit.generated_tokens, at_limit.finished) == (4, True)
    immediate = build_chain_model(tok, {"<|assistant|>": "</s>"})
    r = generate(immediate, tok, ["hi"], GenerationSettings(max_new_tokens=5))[0]
    assert (r.text, r.generated_tokens, r.finished) == ("", 1, True)


def test_on_batch_reports_each_batch_and_sums_to_total(tok, model):
    calls = []
    results = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=5, batch_size=3),
                       on_batch=lambda n, dt: calls.append((n, dt)))
    assert len(calls) == 3  # 7 prompts in batches of 3
    assert sum(n for n, _ in calls) == sum(r.generated_tokens for r in results) == summarize(results)[
        "generated_tokens"]
    assert all(dt > 0 for _, dt in calls)


def test_sampling_is_seeded_and_gives_num_samples_per_prompt(tok, model):
    s = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, num_samples=3, seed=7, batch_size=6)
    a = generate(model, tok, PROMPTS[:3], s)
    b = generate(model, tok, PROMPTS[:3], s)
    assert [(r.prompt_index, r.sample_index) for r in a] == [(i, j) for i in range(3) for j in range(3)]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({r.token_ids for r in a}) > 3  # samples actually differ
    c = generate(model, tok, PROMPTS[:3], GenerationSettings(**{**s.__dict__, "seed": 8}))
    assert [r.token_ids for r in c] != [r.token_ids for r in a]


def test_overlong_prompts_are_truncated_or_dropped_and_counted_never_crash(tok, model):
    long_prompt = "y" * 100
    trunc = generate(model, tok, ["hi", long_prompt], GenerationSettings(max_new_tokens=4, max_prompt_tokens=20))
    assert trunc[0].truncated_tokens == 0 and trunc[1].truncated_tokens == 103 - 20
    assert trunc[1].prompt_tokens == 20 and trunc[1].generated_tokens == 4
    dropped = generate(model, tok, ["hi", long_prompt],
                       GenerationSettings(max_new_tokens=4, max_prompt_tokens=20, prompt_overflow="drop"))
    assert not dropped[0].dropped and dropped[1].dropped and dropped[1].generated_tokens == 0
    stats = summarize(dropped)
    assert stats["dropped_prompts"] == 1 and stats["input_tokens"] == 5 and stats["generated_tokens"] == 4
    # no explicit limit: the model's context (512) minus max_new_tokens applies
    ctx = generate(model, tok, ["z" * 600], GenerationSettings(max_new_tokens=12))[0]
    assert ctx.prompt_tokens == 500 and ctx.truncated_tokens == 603 - 500


def test_continuous_batching_matches_static_greedy(tok, model):
    static = generate(model, tok, PROMPTS[:2], GenerationSettings(max_new_tokens=4))
    cb = generate(model, tok, PROMPTS[:2], GenerationSettings(max_new_tokens=4, continuous_batching=True))
    assert [r.token_ids for r in cb] == [r.token_ids for r in static]
    assert [r.generated_tokens for r in cb] == [r.generated_tokens for r in static]


@pytest.mark.parametrize("bad, key", [({"backend": "tgi"}, "backend"), ({"batch_size": 0}, "batch_size"),
                                      ({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"),
                                      ({"num_samples": 2}, "num_samples"), ({"max_prompt_tokens": "x"},
                                                                           "max_prompt_tokens"),
                                      ({"prompt_overflow": "wrap"}, "prompt_overflow"), ({"beams": 4}, "beams")])
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(ValueError, match=f"synthetic.*{key}|{key}.*"):
        GenerationSettings.from_dict(bad, where="synthetic")


def test_from_dict_accepts_config_spelling_samples_per_prompt():
    s = GenerationSettings.from_dict({"samples_per_prompt": 4, "temperature": 0.7, "shards": 2},
                                     ignore=("shards",))
    assert s.num_samples == 4


def _hide_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError


def test_vllm_requested_without_vllm_installed_is_a_clear_error(tok, model, monkeypatch):
    _hide_vllm(monkeypatch)
    with pytest.raises(RuntimeError, match=r"backend 'vllm' requested but vllm is not installed.*distill-bench\["
                                           r"vllm\].*synthetic.backend: hf"):
        generate("/nonexistent", tok, ["hi"], GenerationSettings(backend="vllm", max_new_tokens=8))
    assert resolve_backend("auto") == "hf"
    assert generate(model, tok, ["hi"], GenerationSettings(backend="auto", max_new_tokens=2))[0].generated_tokens == 2


@dataclass
class FakeCompletion:
    index: int
    text: str
    token_ids: list
    finish_reason: str


@dataclass
class FakeRequestOutput:
    request_id: str
    prompt_token_ids: list
    outputs: list


def _fake_vllm(log):
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            log["sampling"] = kw

    class LLM:
        def __init__(self, **kw):
            log["llm"] = kw
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=64))

        def generate(self, prompts, params, use_tqdm=True):
            log["prompts"] = prompts
            outs = []
            for i, p in enumerate(prompts):
                comps = [FakeCompletion(j, f"p{i}s{j}", list(range(i + j + 1)), "stop" if (i + j) % 2 == 0
                                        else "length") for j in range(params.kw["n"])][::-1]  # unordered
                outs.append(FakeRequestOutput(str(100 + i), list(p["prompt_token_ids"]), comps))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_adapter_maps_requests_and_outputs_exactly(tok, tmp_path, monkeypatch):
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    log = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(log))
    prompts = ["hi", "y" * 80, "What is 2+3?"]
    settings = GenerationSettings(backend="vllm", temperature=0.7, top_p=0.9, num_samples=2, seed=5,
                                  max_new_tokens=16, prompt_overflow="drop", dtype="bfloat16")
    batches = []
    results = generate(str(tmp_path / "model"), str(tok_dir), prompts, settings,
                       on_batch=lambda n, dt: batches.append(n))
    assert log["llm"] == {"model": str(tmp_path / "model"), "tokenizer": str(tok_dir), "seed": 5, "dtype": "bfloat16"}
    assert log["sampling"] == {"n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "seed": 5}
    ids = encode_chat(tok, prompts)
    # prompt 1 is longer than max_model_len - max_new_tokens = 48 -> dropped before reaching vLLM
    assert log["prompts"] == [{"prompt_token_ids": ids[0]}, {"prompt_token_ids": ids[2]}]
    got = [(r.prompt_index, r.sample_index, r.text, r.prompt_tokens, r.generated_tokens, r.finished, r.dropped)
           for r in results]
    assert got == [(0, 0, "p0s0", len(ids[0]), 1, True, False), (0, 1, "p0s1", len(ids[0]), 2, False, False),
                   (1, 0, "", len(ids[1]), 0, False, True), (1, 1, "", len(ids[1]), 0, False, True),
                   (2, 0, "p1s0", len(ids[2]), 2, False, False), (2, 1, "p1s1", len(ids[2]), 3, True, False)]
    assert batches == [1 + 2 + 2 + 3]


def test_vllm_greedy_uses_temperature_zero(tok, tmp_path, monkeypatch):
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    log = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(log))
    generate(str(tmp_path), str(tok_dir), ["hi"], GenerationSettings(backend="vllm", max_new_tokens=8))
    assert log["sampling"]["temperature"] == 0.0 and log["sampling"]["n"] == 1
