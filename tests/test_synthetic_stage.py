"""Sharded synthetic generation + merge on a tiny random-init Llama (char-level toy tokenizer, CPU, seconds)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

from distill_bench.synthetic import stage  # noqa: E402
from distill_bench.synthetic.filters import NoSurvivorsError  # noqa: E402
from conftest import FakeMeter  # noqa: E402

MAX_NEW = 8
CONTEXT = 64                     # prompts over 64 - 8 = 56 templated tokens are dropped
NO_FILTERS = {"min_tokens": None, "max_tokens": None, "drop_truncated": False, "dedup": False,
              "verify_answer": False}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from distill_bench.data.io import save_dataset_dir
    from toy_generation import build_toy_model, build_toy_tokenizer

    root = tmp_path_factory.mktemp("synthetic")
    tok = build_toy_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    build_toy_model(tok, max_position_embeddings=CONTEXT, seed=3).save_pretrained(root / "teacher")
    prompts = [f"What is {a} + {b}?" + " Think." * (a % 3) for a, b in zip(range(1, 21), range(7, 27))]
    prompts.insert(5, "Tell me " + "a very long story " * 4)    # 8 + 72 chars: over the prompt limit
    rows = [{"id": f"t-train-{i}", "prompt": p, "response": "x\n#### 1", "answer": "1", "source": "embedded"}
            for i, p in enumerate(prompts)]
    eval_rows = [{"id": f"t-eval-{i}", "prompt": f"What is {i} + 1?", "response": f"#### {i + 1}",
                  "answer": str(i + 1), "source": "embedded"} for i in range(3)]
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                "eval": datasets.Dataset.from_list(eval_rows)})
    save_dataset_dir(dsd, root / "data", {"content_hash": "test"})
    return {"root": root, "teacher": str(root / "teacher"), "tokenizer": str(root / "tokenizer"),
            "dataset": str(root / "data"), "n_train": len(rows), "tok": tok}


def synth(**kw):
    base = {"backend": "hf", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "samples_per_prompt": 1,
            "batch_size": 2, "shards": 1, "n_prompts": None, "filters": dict(NO_FILTERS)}
    base.update(kw)
    return base


def run_shards(env, name, synthetic, num_shards, meters=None):
    paths = []
    for i in range(num_shards):
        meter = FakeMeter()
        out = env["root"] / name / f"shard-{i}-of-{num_shards}"
        stage.generate_shard(meter=meter, teacher=env["teacher"], tokenizer=env["tokenizer"],
                             dataset=env["dataset"], out_dir=str(out), synthetic=synthetic, shard=i,
                             num_shards=num_shards, seed=11)
        if meters is not None:
            meters.append(meter)
        paths.append(str(out))
    return paths


def merge(env, name, paths, synthetic, meter=None):
    out = env["root"] / name / "merged"
    stage.merge_shards(meter=meter or FakeMeter(), shards=paths, out_dir=str(out), synthetic=synthetic,
                       dataset=env["dataset"])
    return datasets.load_from_disk(str(out)), out


@pytest.fixture(scope="module")
def greedy_unsharded(env):
    meters = []
    paths = run_shards(env, "greedy1", synth(), 1, meters)
    dsd, out = merge(env, "greedy1", paths, synth())
    return dsd, out, meters[0], paths


@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_greedy_merge_equals_unsharded(env, greedy_unsharded, num_shards):
    paths = run_shards(env, f"greedy{num_shards}", synth(), num_shards)
    dsd, _ = merge(env, f"greedy{num_shards}", paths[::-1], synth())   # given out of order: merged by index
    assert dsd["train"].to_list() == greedy_unsharded[0]["train"].to_list()


def test_sampled_sharded_merge_equals_unsharded_with_hf(env):
    cfg = synth(temperature=1.0, samples_per_prompt=2, batch_size=4)
    one, _ = merge(env, "sample1", run_shards(env, "sample1", cfg, 1), cfg)
    two, _ = merge(env, "sample2", run_shards(env, "sample2", cfg, 2), cfg)
    assert one["train"].to_list() == two["train"].to_list()
    assert set(one["train"]["sample_index"]) == {0, 1}


def test_records_keep_prompt_order_schema_and_reference_answers(env, greedy_unsharded):
    dsd, out, _, _ = greedy_unsharded
    train = dsd["train"]
    assert train["prompt_id"] == [f"t-train-{i}" for i in range(env["n_train"]) if i != 5]
    assert train["id"][0] == "t-train-0-s0"
    assert set(train["answer"]) == {"1"}
    assert all(s.startswith("synthetic:") for s in train["source"])
    from distill_bench.data.io import load_dataset_dir

    reloaded = load_dataset_dir(out)                     # readable like any prepared dataset dir
    assert reloaded["eval"].to_list() == datasets.load_from_disk(env["dataset"])["eval"].to_list()


def test_token_counts_are_exact_per_sample_sums(env, greedy_unsharded):
    from distill_bench.models.tokenizer import encode_prompt

    dsd, _, meter, _ = greedy_unsharded
    train = dsd["train"]
    tok = env["tok"]
    # char-level tokenizer: <s><|user|> + one token per char + <|assistant|>
    assert train["prompt_tokens"] == [len(encode_prompt(tok, p)) for p in train["prompt"]]
    assert train["prompt_tokens"][0] == len("What is 1 + 7? Think.") + 3
    for row in train:
        assert 1 <= row["generated_tokens"] <= MAX_NEW
        n_text = len(tok(row["response"], add_special_tokens=False)["input_ids"])
        assert row["generated_tokens"] >= n_text          # + EOS when finished (whitespace stripped from text)
        assert row["finished"] or row["generated_tokens"] == MAX_NEW
    assert meter.tokens == {"generated_tokens": sum(train["generated_tokens"]),
                            "input_tokens": sum(train["prompt_tokens"])}
    assert meter.primary == "generated_tokens"
    assert meter.steady_marks == 1


def test_prompt_longer_than_context_is_dropped_with_a_count(env, greedy_unsharded):
    _, out, meter, paths = greedy_unsharded
    info = json.loads((stage.Path(paths[0]) / stage.SHARD_INFO).read_text())
    assert info["prompts_dropped_too_long"] == 1 and info["dropped_prompt_ids"] == ["t-train-5"]
    assert meter.metrics["prompts_dropped_too_long"] == 1
    synthetic_info = json.loads((out / stage.SYNTHETIC_INFO).read_text())
    assert synthetic_info["totals"]["prompts_dropped_too_long"] == 1
    assert synthetic_info["totals"]["samples"] == env["n_train"] - 1


def test_sampled_samples_count_prompt_tokens_once_per_sample(env):
    cfg = synth(temperature=1.0, samples_per_prompt=2, batch_size=4, n_prompts=4)
    meters = []
    paths = run_shards(env, "sample-n4", cfg, 1, meters)
    ds = datasets.load_from_disk(str(stage.Path(paths[0]) / "data"))
    assert len(ds) == 8
    assert meters[0].tokens["input_tokens"] == 2 * sum(ds["prompt_tokens"][::2]) == sum(ds["prompt_tokens"])


def test_interrupted_shard_resumes_from_completed_chunks(env, greedy_unsharded, monkeypatch):
    from distill_bench.generation import chunked

    real, calls = chunked.generate, []

    def flaky(model, tok, prompts, settings, on_batch=None):
        calls.append(prompts[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated SIGTERM")
        return real(model, tok, prompts, settings, on_batch=on_batch)

    monkeypatch.setattr(chunked, "generate", flaky)   # the chunked loop the stage generates through
    out = env["root"] / "resume" / "shard-0-of-1"
    kwargs = dict(teacher=env["teacher"], tokenizer=env["tokenizer"], dataset=env["dataset"], out_dir=str(out),
                  synthetic=synth(), shard=0, num_shards=1, seed=11)
    with pytest.raises(KeyboardInterrupt):
        stage.generate_shard(meter=FakeMeter(), **kwargs)
    assert not out.exists()                                        # no half-written shard
    assert len(list(out.with_name(out.name + ".partial").glob("chunk-*.jsonl"))) == 1
    meter = FakeMeter()
    info = stage.generate_shard(meter=meter, **kwargs)
    assert info["resumed_chunks"] == 1 and len(calls) == 4         # 1 ok + 1 interrupted + the 2 remaining
    assert not out.with_name(out.name + ".partial").exists()
    resumed = datasets.load_from_disk(str(out / "data")).to_list()
    reference = datasets.load_from_disk(str(stage.Path(greedy_unsharded[3][0]) / "data")).to_list()
    assert resumed == reference
    # this attempt is charged only for what it generated
    assert meter.tokens["generated_tokens"] == sum(r["generated_tokens"] for r in resumed
                                                  if int(r["prompt_id"].rsplit("-", 1)[1]) >= 8)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_synthetic_hf_decode_reaches_the_decode_loop(env, decode_modes, mode):
    run_shards(env, f"decode-{mode}", synth(hf_decode=mode, n_prompts=2), 1)
    assert decode_modes and set(decode_modes) == {mode}


def test_synthetic_hf_prefill_reaches_the_decode_loop_without_changing_the_artifact_id(env, decode_modes):
    from distill_bench.synthetic.ids import generation_shard_key, synthetic_artifact_id

    run_shards(env, "prefill-packed", synth(hf_decode="graph", hf_prefill="packed", n_prompts=2), 1)
    assert decode_modes.prefill and set(decode_modes.prefill) == {"packed"}
    plain, packed = synth(), synth(hf_prefill="packed")
    assert generation_shard_key("arith", plain) == generation_shard_key("arith", packed)
    assert synthetic_artifact_id("arith", plain) == synthetic_artifact_id("arith", packed)


def test_merge_applies_filters_and_records_counts(env, greedy_unsharded):
    cfg = synth(filters={"min_tokens": 1, "max_tokens": None, "drop_truncated": True, "dedup": True,
                         "verify_answer": False})
    _, _, _, paths = greedy_unsharded
    unfinished = sum(not r["finished"] for r in greedy_unsharded[0]["train"])
    if unfinished == len(greedy_unsharded[0]["train"]):
        with pytest.raises(NoSurvivorsError, match="synthetic.filters.drop_truncated"):
            merge(env, "filtered", paths, cfg)
        return
    meter = FakeMeter()
    dsd, out = merge(env, "filtered", paths, cfg, meter)
    counts = meter.metrics["filter_counts"]
    assert counts["dropped"]["drop_truncated"] == unfinished
    assert counts["kept"] == len(dsd["train"]) == counts["input"] - sum(counts["dropped"].values())
    assert all(dsd["train"]["finished"])
    assert json.loads((out / stage.SYNTHETIC_INFO).read_text())["filter_counts"] == counts


def test_merge_zero_survivors_names_the_filter(env, greedy_unsharded):
    cfg = synth(filters={**NO_FILTERS, "min_tokens": MAX_NEW + 1})
    with pytest.raises(NoSurvivorsError, match=r"synthetic\.filters\.min_tokens"):
        merge(env, "nothing", greedy_unsharded[3], cfg)
    assert not (env["root"] / "nothing" / "merged").exists()


def test_merge_rejects_shard_without_completion_marker(env, greedy_unsharded, tmp_path):
    import shutil

    broken = tmp_path / "shard-0-of-1"
    shutil.copytree(greedy_unsharded[3][0], broken)
    (broken / stage.SHARD_INFO).unlink()
    with pytest.raises(FileNotFoundError, match=f"{broken}.*completion marker"):
        merge(env, "broken", [str(broken)], synth())


def test_merge_rejects_missing_shard(env):
    paths = run_shards(env, "greedy3", synth(), 3)   # reuses the dirs when the 3-shard test ran first
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) \[1\] of 3 missing"):
        merge(env, "missing", [paths[0], paths[2]], synth())


def test_unknown_backend_or_bad_decoding_is_named(env):
    with pytest.raises(ValueError, match="synthetic"):
        stage.generate_shard(meter=FakeMeter(), teacher=env["teacher"], tokenizer=env["tokenizer"],
                             dataset=env["dataset"], out_dir=str(env["root"] / "bad"),
                             synthetic=synth(temperature=-1.0), shard=0, num_shards=1, seed=1)


def test_runs_through_the_stage_registry_with_the_real_meter(env, tmp_path):
    from distill_bench.stages import run_named_stage

    cfg = synth(n_prompts=12)
    shard_dir, merged_dir = tmp_path / "shard-0-of-1", tmp_path / "merged"
    energy = {"codecarbon": False, "sample_interval_s": 0.5, "cpu_tdp_w": 10.0}
    run_named_stage("generate_synthetic", out_json=tmp_path / "gen.json",
                    meter_args={"stage_id": "teacher.generate.t.0", "energy": energy},
                    kwargs=dict(teacher=env["teacher"], tokenizer=env["tokenizer"], dataset=env["dataset"],
                                out_dir=str(shard_dir), synthetic=cfg, shard=0, num_shards=1, seed=11))
    run_named_stage("merge_synthetic", out_json=tmp_path / "merge.json",
                    meter_args={"stage_id": "teacher.merge.t", "energy": energy},
                    kwargs=dict(shards=[str(shard_dir)], out_dir=str(merged_dir), synthetic=cfg,
                                dataset=env["dataset"]))
    gen = json.loads((tmp_path / "gen.json").read_text())
    ds = datasets.load_from_disk(str(shard_dir / "data"))
    assert gen["status"] == "complete" and gen["role"] == "teacher"
    assert gen["tokens"]["counts"] == {"generated_tokens": sum(ds["generated_tokens"]),
                                       "input_tokens": sum(ds["prompt_tokens"])}
    assert gen["tokens"]["primary"] == "generated_tokens"
    steady = gen["throughput"]["steady_state"]                  # marked after the first batch of 2 prompts
    assert 0 < steady["tokens"] < gen["tokens"]["counts"]["generated_tokens"]
    merged = json.loads((tmp_path / "merge.json").read_text())
    assert merged["status"] == "complete" and merged["metrics"]["samples_kept"] == len(ds)
    assert merged["metrics"]["generated_tokens_total"] == sum(ds["generated_tokens"])


def test_more_shards_than_chunks_leaves_valid_empty_shards(env):
    cfg = synth(n_prompts=8)                                    # batch 2 x 4 batches = one chunk of 8 prompts
    one, _ = merge(env, "small1", run_shards(env, "small1", cfg, 1), cfg)
    meters = []
    paths = run_shards(env, "small4", cfg, 4, meters)
    assert [len(datasets.load_from_disk(str(stage.Path(p) / "data"))) for p in paths] == [0, 0, 0, 7]
    assert [m.tokens["generated_tokens"] for m in meters[:3]] == [0, 0, 0]
    four, _ = merge(env, "small4", paths, cfg)
    assert four["train"].to_list() == one["train"].to_list()


def test_bad_n_prompts_is_named(env):
    with pytest.raises(ValueError, match=r"synthetic\.n_prompts"):
        stage.generate_shard(meter=FakeMeter(), teacher=env["teacher"], tokenizer=env["tokenizer"],
                             dataset=env["dataset"], out_dir=str(env["root"] / "bad"),
                             synthetic=synth(n_prompts="all"), shard=0, num_shards=1, seed=1)
