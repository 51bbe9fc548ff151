"""Public architectures by local path through every stage, per-model tokenizers, and the KD vocabulary rule.

Tiny random checkpoints of Llama (SmolLM2 layout, tied, no pad token), Qwen2 (untied with an embedding padded beyond
its tokenizer, and tied) and OLMo-2 (untied; with and without a chat template) are saved in Hugging Face format by
``distill_bench.models.random_checkpoint`` and loaded by path, as a config's ``name_or_path`` names a local copy.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FakeMeter, arith_pairs, save_pairs_dataset

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [t for p, r in arith_pairs(200, seed=3) for t in (p, r)]
TRAINING = {"token_budget": 160, "max_length": 256, "batch_size": 4, "lr": 1e-3, "precision": "fp32",
            "save_steps": 1000, "warmup_ratio": 0.0, "stale_checkpoints": "set_aside"}
# name -> (architecture, tokenizer family, tokenizer size, embedding rows, tied, pad token, chat template)
MODELS = {
    "llama_tied_nopad": ("smollm2-360m-instruct", "smollm2", 512, 512, True, False, True),
    "qwen2_untied_padded": ("qwen2.5-7b-instruct", "qwen2.5", 600, 640, False, True, True),
    "qwen2_tied": ("qwen2.5-0.5b", "qwen2.5", 600, 608, True, True, True),
    "olmo2_untied": ("olmo2-1b", "olmo2", 600, 600, False, True, True),
    "olmo2_no_template": ("olmo2-1b", "olmo2", 600, 600, False, True, False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from distill_bench.models.random_checkpoint import build_tokenizer, save_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (arch, family, size, rows, tie, pad, template) in MODELS.items():
        tok = build_tokenizer(family, TEXTS, size=size, bpe_vocab=400, pad=pad, chat_template=template)
        out[name] = str(save_random_checkpoint(arch, root / name, tok, tiny=True, tie=tie, vocab_size=rows))
    out["data"] = str(save_pairs_dataset(root / "data", arith_pairs(24, seed=1)))
    return out


def _init(checkpoints, name, tmp_path, **spec):
    from distill_bench.models.stage import init_student

    out = tmp_path / f"init_{name}"
    meter = FakeMeter()
    init_student(meter=meter, out_dir=str(out), seed=0,
                 student={"init": "pretrained", "name_or_path": checkpoints[name], **spec})
    return str(out), meter


@pytest.mark.parametrize("name", ["llama_tied_nopad", "qwen2_untied_padded", "olmo2_untied"])
def test_architecture_by_local_path_through_init_generation_cache_training_and_eval(checkpoints, name, tmp_path):
    from transformers import AutoConfig

    from distill_bench.eval.stage import evaluate
    from distill_bench.kd.stage import cache_logits
    from distill_bench.synthetic.stage import generate_shard
    from distill_bench.train.stage import train_student

    model_dir, meter = _init(checkpoints, name, tmp_path)
    ref = json.loads((Path(model_dir) / "model_ref.json").read_text())
    assert ref["name_or_path"] == checkpoints[name] and ref["tokenizer"] == checkpoints[name]
    assert meter.metrics["embedding_rows"] == MODELS[name][3] and meter.metrics["tokenizer_size"] == MODELS[name][2]
    assert AutoConfig.from_pretrained(checkpoints[name]).tie_word_embeddings is MODELS[name][4]

    gen = FakeMeter()
    generate_shard(meter=gen, teacher=model_dir, tokenizer=model_dir, dataset=checkpoints["data"],
                   out_dir=str(tmp_path / "shard"), shard=0, num_shards=1, seed=0,
                   synthetic={"backend": "hf", "max_new_tokens": 6, "batch_size": 8, "n_prompts": 8,
                              "temperature": 0.0, "top_p": 1.0, "samples_per_prompt": 1, "hf_decode": "eager"})
    assert 0 < gen.tokens["generated_tokens"] <= 8 * 6

    cache = FakeMeter()
    cache_logits(meter=cache, teacher=model_dir, tokenizer=model_dir, dataset=checkpoints["data"],
                 out_dir=str(tmp_path / "cache"), kd={"top_k": 8, "batch_size": 8}, training=TRAINING, seed=0)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["vocab_size"] == MODELS[name][2]        # padded rows are no token: never in the cache
    assert cache.tokens["cached_positions"] > 0

    for method in ("sft_gt", "kd"):
        train = FakeMeter()
        train_student(meter=train, pipeline=method, dataset=checkpoints["data"], tokenizer=model_dir,
                      init_model=model_dir, out_dir=str(tmp_path / method), training=TRAINING, seed=0,
                      kd_cache=str(tmp_path / "cache") if method == "kd" else None,
                      kd={"top_k": 8, "temperature": 1.0, "alpha": 0.5} if method == "kd" else None)
        assert train.tokens["trained_tokens"] == TRAINING["token_budget"]
        final = tmp_path / method / "final"
        assert (final / "config.json").is_file() and (final / "tokenizer_config.json").is_file()

    ev = FakeMeter()
    result = evaluate(meter=ev, model=str(tmp_path / "kd" / "final"), tokenizer=str(tmp_path / "kd" / "final"),
                      dataset=checkpoints["data"], out_json=str(tmp_path / "eval.json"), model_id="kd.x",
                      seed=0, eval={"backend": "native", "max_new_tokens": 6, "batch_size": 8,
                                    "bootstrap_samples": 10, "limit": 4})
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 4
    assert result is not None


def test_every_generating_stage_puts_its_model_on_the_gpu_when_one_is_visible(checkpoints, tmp_path, monkeypatch):
    """Evaluation, synthetic generation and preference sampling load their model through one loader that moves it
    to CUDA when a GPU is visible (here: the loader's device argument, recorded; the model stays on the CPU)."""
    import torch

    import distill_bench.models.build as build
    from distill_bench.dpo.stage import sample_candidates
    from distill_bench.eval.stage import evaluate
    from distill_bench.synthetic.stage import generate_shard

    devices = []
    real_load = build.load_model

    def recording_load(ref, dtype=None, device=None):
        devices.append(device)
        return real_load(ref, dtype=dtype)

    monkeypatch.setattr(build, "load_model", recording_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model_dir, _ = _init(checkpoints, "qwen2_tied", tmp_path)
    evaluate(meter=FakeMeter(), model=model_dir, tokenizer=model_dir, dataset=checkpoints["data"],
             out_json=str(tmp_path / "eval.json"), model_id="m", seed=0,
             eval={"backend": "native", "max_new_tokens": 4, "batch_size": 4, "bootstrap_samples": 10, "limit": 4,
                   "hf_decode": "eager"})
    assert devices == ["cuda"], "evaluation"
    generate_shard(meter=FakeMeter(), teacher=model_dir, tokenizer=model_dir, dataset=checkpoints["data"],
                   out_dir=str(tmp_path / "shard"), shard=0, num_shards=1, seed=0,
                   synthetic={"backend": "hf", "max_new_tokens": 4, "batch_size": 4, "n_prompts": 4,
                              "temperature": 0.0, "top_p": 1.0, "samples_per_prompt": 1, "hf_decode": "eager"})
    assert devices == ["cuda"] * 2, "synthetic generation"
    sample_candidates(meter=FakeMeter(), models={"student": model_dir}, dataset=checkpoints["data"],
                      out_dir=str(tmp_path / "cand"), seed=0,
                      dpo={"n_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 4, "batch_size": 4})
    assert devices == ["cuda"] * 3, "preference sampling"


def test_cross_family_synthetic_sft_counts_each_side_with_its_own_tokenizer(checkpoints, tmp_path):
    """A Qwen2 teacher's text trains a Llama student: generated tokens by the teacher's tokenizer, trained tokens by
    the student's (the vocabularies differ, which only logit KD would care about)."""
    from distill_bench.models.tokenizer import load_tokenizer
    from distill_bench.models.vocab import vocabulary_hash
    from distill_bench.synthetic.stage import generate_shard, merge_shards
    from distill_bench.train.stage import train_student

    teacher, _ = _init(checkpoints, "qwen2_tied", tmp_path)
    student, _ = _init(checkpoints, "llama_tied_nopad", tmp_path)
    t_tok, s_tok = load_tokenizer(teacher), load_tokenizer(student)
    assert vocabulary_hash(t_tok) != vocabulary_hash(s_tok)
    gen = FakeMeter()
    syn = {"backend": "hf", "max_new_tokens": 8, "batch_size": 8, "n_prompts": 8, "temperature": 0.0, "top_p": 1.0,
           "samples_per_prompt": 1, "hf_decode": "eager",
           "filters": {"min_tokens": 1, "drop_truncated": False, "dedup": False}}
    generate_shard(meter=gen, teacher=teacher, tokenizer=teacher, dataset=checkpoints["data"],
                   out_dir=str(tmp_path / "shard"), shard=0, num_shards=1, seed=0, synthetic=syn)
    merge_shards(meter=FakeMeter(), shards=[str(tmp_path / "shard")], out_dir=str(tmp_path / "syn"), synthetic=syn,
                 dataset=checkpoints["data"])
    from distill_bench.synthetic.stage import read_shard

    shard, _ = read_shard(tmp_path / "shard")
    # the teacher's count is its own tokenizer's: 8 prompts x 8 new tokens of a random model (no eos) under the
    # teacher's ids; the student's segmentation of the same text is another number
    assert gen.tokens["generated_tokens"] == sum(shard["generated_tokens"]) == 64
    texts = list(shard["response"])
    s_count = sum(len(s_tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert s_count != gen.tokens["generated_tokens"]
    train = FakeMeter()
    train_student(meter=train, pipeline="sft", dataset=str(tmp_path / "syn"), tokenizer=student,
                  init_model=student, out_dir=str(tmp_path / "sft"), training=TRAINING, seed=0)
    assert train.tokens["trained_tokens"] == TRAINING["token_budget"]
    saved = load_tokenizer(tmp_path / "sft" / "final")
    assert vocabulary_hash(saved) == vocabulary_hash(s_tok)


def test_dpo_samples_each_source_with_its_own_tokenizer(checkpoints, tmp_path):
    from distill_bench.dpo.stage import sample_candidates

    teacher, _ = _init(checkpoints, "qwen2_tied", tmp_path)
    student, _ = _init(checkpoints, "llama_tied_nopad", tmp_path)
    meter = FakeMeter()
    sample_candidates(meter=meter, models={"teacher": teacher, "student": student}, dataset=checkpoints["data"],
                      out_dir=str(tmp_path / "cand"), seed=0,
                      dpo={"sample_source": "both", "samples_per_prompt": 2, "n_prompts": 4, "max_new_tokens": 4,
                           "batch_size": 8, "temperature": 1.0})
    from distill_bench.dpo.stage import read_candidates

    rows, _ = read_candidates(tmp_path / "cand")
    assert {r["source"] for r in rows} == {"teacher", "student"}
    # each source's tokens by its own tokenizer: a random model never stops, so 4 prompts x 2 samples x 4 tokens
    assert meter.tokens["generated_tokens"] == sum(r["generated_tokens"] for r in rows) == 2 * 4 * 2 * 4


def test_kd_between_different_vocabularies_fails_at_train_start_naming_both(checkpoints, tmp_path):
    from distill_bench.kd.cache import CacheMismatchError
    from distill_bench.kd.stage import cache_logits
    from distill_bench.train.stage import train_student

    teacher, _ = _init(checkpoints, "qwen2_tied", tmp_path)
    student, _ = _init(checkpoints, "olmo2_untied", tmp_path)   # same length (600), another token -> id map
    cache_logits(meter=FakeMeter(), teacher=teacher, tokenizer=teacher, dataset=checkpoints["data"],
                 out_dir=str(tmp_path / "cache"), kd={"top_k": 8, "batch_size": 8}, training=TRAINING, seed=0)
    with pytest.raises(CacheMismatchError, match=r"one vocabulary.*qwen2_tied.*olmo2_untied"):
        train_student(meter=FakeMeter(), pipeline="kd", dataset=checkpoints["data"], tokenizer=student,
                      init_model=student, out_dir=str(tmp_path / "kd"), training=TRAINING, seed=0,
                      kd_cache=str(tmp_path / "cache"), kd={"top_k": 8})


def test_model_without_chat_template_is_refused_never_concatenated(checkpoints, tmp_path):
    from distill_bench.models.tokenizer import MissingChatTemplateError, encode_prompt_response, load_tokenizer

    with pytest.raises(MissingChatTemplateError, match=r"no chat template.*students.<name>.tokenizer"):
        _init(checkpoints, "olmo2_no_template", tmp_path)
    with pytest.raises(MissingChatTemplateError):
        encode_prompt_response(load_tokenizer(checkpoints["olmo2_no_template"]), "2+2?", "4", None)
    # the documented way out: the same vocabulary's tokenizer that has a template
    model_dir, meter = _init(checkpoints, "olmo2_no_template", tmp_path,
                             tokenizer=checkpoints["olmo2_untied"])
    assert load_tokenizer(model_dir).chat_template and meter.metrics["tokenizer"] == checkpoints["olmo2_untied"]


def test_tokenizer_without_pad_token_pads_with_eos_and_still_trains_on_the_closing_eos(checkpoints):
    from distill_bench.models.tokenizer import encode_prompt_response, load_tokenizer
    from distill_bench.train.collate import LMCollator

    tok = load_tokenizer(checkpoints["llama_tied_nopad"])
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    short = encode_prompt_response(tok, "2+2?", "4", None)
    long = encode_prompt_response(tok, "What is 12 plus 30?", "12 + 30 = 42", None)
    batch = LMCollator(tok.pad_token_id)([short, long])
    row = batch["labels"][0].tolist()
    n = len(short["input_ids"])
    # the end of the short answer's turn is a target although its id is the pad id; the pad positions are not
    assert tok.eos_token_id in row[:n] and all(label == -100 for label in row[n:])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(row) - n)


def test_vocabulary_hash_from_files_equals_the_loaded_tokenizers(checkpoints):
    from distill_bench.models.tokenizer import load_tokenizer
    from distill_bench.models.vocab import vocabulary_hash, vocabulary_hash_from_files

    hashes = {}
    for name in MODELS:
        hashes[name] = vocabulary_hash_from_files(checkpoints[name])
        assert hashes[name] == vocabulary_hash(load_tokenizer(checkpoints[name]))
    # pad/template differences are no vocabulary difference; another family is
    assert hashes["olmo2_untied"] == hashes["olmo2_no_template"]
    assert hashes["qwen2_tied"] == hashes["qwen2_untied_padded"] != hashes["olmo2_untied"]


def test_hub_id_on_an_offline_machine_says_to_point_the_config_at_a_local_copy(tmp_path):
    code = ("from distill_bench.models.build import load_model\n"
            "load_model('distill-bench-tests/not-a-downloaded-model')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "hub id 'distill-bench-tests/not-a-downloaded-model'" in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "point the config at the local copy" in proc.stderr


def test_offline_tokenizer_hub_id_gets_the_same_advice(tmp_path, monkeypatch):
    from distill_bench.refs import load_error

    err = load_error("org/model", "tokenizer", OSError("not cached"))
    assert "point the config at the local copy" in str(err) and "huggingface-cli download org/model" in str(err)
    assert "point the config" not in str(load_error(str(tmp_path / "x"), "tokenizer", OSError("bad")))


# ------------------------------------------------------------------------------------------- GPU defaults


@pytest.mark.parametrize("name,varlen", [("llama_tied_nopad", True), ("qwen2_tied", True), ("olmo2_untied", True)])
def test_gpu_defaults_resolve_per_architecture(checkpoints, name, varlen):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill_bench.train.speed import decoder_layers, resolve_gpu_defaults

    cfg = AutoConfig.from_pretrained(checkpoints[name])
    cfg._attn_implementation = "sdpa"
    gpu = resolve_gpu_defaults({}, cfg, on_gpu=True, varlen_available=True)
    assert gpu == {"model_type": cfg.model_type, "attn_implementation": "varlen" if varlen else "sdpa",
                   "padding_free": True, "pad_to_multiple_of": 64, "torch_compile": "layers"}
    assert resolve_gpu_defaults({}, cfg, on_gpu=True, varlen_available=False)["attn_implementation"] == "sdpa"
    cpu = resolve_gpu_defaults({}, cfg, on_gpu=False)
    assert cpu == {"model_type": cfg.model_type, "attn_implementation": "sdpa", "padding_free": False,
                   "pad_to_multiple_of": None, "torch_compile": "none"}
    explicit = resolve_gpu_defaults({"attn_implementation": "flex_attention", "torch_compile": False}, cfg,
                                    on_gpu=True, varlen_available=True)
    assert explicit["attn_implementation"] == "flex_attention" and explicit["torch_compile"] == "none"
    model = AutoModelForCausalLM.from_pretrained(checkpoints[name])
    assert len(decoder_layers(model)) == cfg.num_hidden_layers      # what per-layer compile wraps


def test_sliding_window_qwen2_keeps_its_own_attention():
    from transformers import Qwen2Config

    from distill_bench.train.speed import resolve_gpu_defaults

    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    cfg._attn_implementation = "sdpa"
    assert resolve_gpu_defaults({}, cfg, on_gpu=True, varlen_available=True)["attn_implementation"] == "sdpa"


# ------------------------------------------------------------------------------------------- planning


def _local_kd_config(checkpoints, teacher: str, student: str, student_tokenizer: str | None = None) -> dict:
    student_spec = {"init": "pretrained", "name_or_path": checkpoints[student]}
    if student_tokenizer:
        student_spec["tokenizer"] = checkpoints[student_tokenizer]
    return {"datasets": {"d": {"source": "embedded", "n_train": 10, "n_eval": 5}},
            "teacher": {"source": "pretrained", "name_or_path": checkpoints[teacher]},
            "students": {"s": student_spec},
            "experiments": [{"pipeline": "kd", "students": ["s"], "datasets": ["d"]},
                            {"pipeline": "sft", "students": ["s"], "datasets": ["d"]}]}


def test_kd_with_different_local_vocabularies_is_a_planning_error_naming_both(checkpoints):
    from distill_bench.config import ConfigError, build_plan, load_config

    cfg = _local_kd_config(checkpoints, "qwen2_tied", "olmo2_untied")
    with pytest.raises(ConfigError) as err:
        build_plan(load_config(cfg))
    msg = str(err.value)
    assert "kd.s.d" in msg and checkpoints["qwen2_tied"] in msg and checkpoints["olmo2_untied"] in msg
    # the text pipelines alone plan fine across vocabularies
    cfg["experiments"] = cfg["experiments"][1:]
    plan = build_plan(load_config(cfg))
    assert plan.tokenizer_of("teacher") == checkpoints["qwen2_tied"]
    assert plan.tokenizer_of("sft.s.d.s1") == checkpoints["olmo2_untied"]


def test_kd_between_one_vocabulary_with_other_pad_and_template_plans(checkpoints):
    from distill_bench.config import build_plan, load_config

    plan = build_plan(load_config(_local_kd_config(checkpoints, "qwen2_untied_padded", "qwen2_tied")))
    assert "kd.s.d.s1" in plan.experiments and not plan.uses_run_tokenizer()
    assert "setup.tokenizer" not in plan.setup_stage_ids()


def test_kd_vocabularies_of_hub_ids_are_compared_from_the_local_hf_cache(checkpoints, tmp_path, monkeypatch):
    from distill_bench.config import ConfigError, build_plan, load_config

    cache = tmp_path / "hub"
    for repo, name in (("acme/teacher", "qwen2_tied"), ("acme/student", "llama_tied_nopad")):
        snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        (snap / "tokenizer.json").write_text((Path(checkpoints[name]) / "tokenizer.json").read_text())
        (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
        (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    cfg = {"datasets": {"d": {"source": "embedded", "n_train": 10, "n_eval": 5}},
           "teacher": {"source": "pretrained", "name_or_path": "acme/teacher"},
           "students": {"s": {"init": "pretrained", "name_or_path": "acme/student"}},
           "experiments": [{"pipeline": "kd", "students": ["s"], "datasets": ["d"]}]}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert build_plan(load_config(copy.deepcopy(cfg)))          # not cached: checked at train start instead
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ConfigError, match=r"'acme/teacher'.*'acme/student'"):
        build_plan(load_config(cfg))


def test_per_model_tokenizer_key_is_for_pretrained_models_only():
    from distill_bench.config import ConfigError, load_config

    cfg = yaml.safe_load((ROOT / "workflow_config.yaml").read_text())
    cfg["students"]["tiny"]["tokenizer"] = "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ConfigError, match=r"students.tiny.tokenizer.*only a pretrained model"):
        load_config(cfg)


def test_missing_local_tokenizer_path_is_refused_at_planning_naming_the_key(checkpoints):
    from distill_bench.config import ConfigError, load_config

    cfg = _local_kd_config(checkpoints, "qwen2_tied", "qwen2_tied")
    cfg["students"]["s"]["tokenizer"] = "/no/such/tokenizer"
    with pytest.raises(ConfigError, match=r"students.s.tokenizer.*'/no/such/tokenizer' does not exist"):
        load_config(cfg)


def test_embedded_default_keeps_the_one_trained_tokenizer():
    from distill_bench.config import build_plan, load_config

    plan = build_plan(load_config(ROOT / "workflow_config.yaml"))
    models = ["teacher", "init.tiny", *plan.experiments]
    assert all(plan.tokenizer_of(m) is None for m in models) and plan.uses_run_tokenizer()
    assert "setup.tokenizer" in plan.setup_stage_ids()


def test_workstation_config_plans_offline_without_weights(tmp_path):
    from test_workflow import planned_jobs, snakemake

    from distill_bench.config import build_plan, load_config

    plan = build_plan(load_config(ROOT / "configs" / "workstation.yaml"))
    assert sorted({e.seed for e in plan.experiments.values()}) == [1234, 1235, 1236]
    kd = [e for e in plan.experiments.values() if e.trainer == "kd" and e.pipeline == "kd"]
    assert [e.student for e in kd] == ["qwen05"] * 3   # one per seed, never the cross-family student
    assert {e.student for e in plan.experiments.values()} == {"qwen05", "smol360"}
    assert {e.pipeline for e in plan.experiments.values()} == {"sft_gt", "kd", "sft", "dpo", "selfdistill",
                                                                "continued"}
    assert plan.tokenizer_of("init.smol360") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert plan.tokenizer_of("init.qwen05") == "Qwen/Qwen2.5-0.5B-Instruct"
    proc = snakemake("-n", "--configfile", str(ROOT / "configs" / "workstation.yaml"), cwd=tmp_path)
    rules = [r for r, _ in planned_jobs(proc.stdout)]
    assert "prepare_tokenizer" not in rules and rules.count("train_student") == len(plan.experiments)
    blocks = proc.stdout.split("\nrule ")
    for rule in ("train_student", "generate_synthetic", "cache_logits", "evaluate", "sample_preferences"):
        block = next(b for b in blocks if b.startswith(f"{rule}:"))
        assert "gpu=1" in block, rule


def test_workstation_config_refuses_kd_for_the_cross_family_student(tmp_path, checkpoints):
    """The same config with local copies: adding the SmolLM2 student to kd is refused at planning, naming both."""
    from distill_bench.config import ConfigError, build_plan, load_config

    cfg = yaml.safe_load((ROOT / "configs" / "workstation.yaml").read_text())
    cfg["teacher"]["name_or_path"] = checkpoints["qwen2_untied_padded"]
    cfg["students"]["qwen05"].update(name_or_path=checkpoints["qwen2_tied"], tokenizer=None)
    cfg["students"]["smol360"]["name_or_path"] = checkpoints["llama_tied_nopad"]
    cfg["datasets"]["gsm8k"]["path"] = str(ROOT / "tests" / "fixtures" / "data" / "gsm8k")
    assert build_plan(load_config(copy.deepcopy(cfg)))
    cfg["experiments"][1]["students"] = ["qwen05", "smol360"]
    with pytest.raises(ConfigError, match=r"kd\.smol360\.gsm8k.*teacher.*llama_tied_nopad"):
        build_plan(load_config(cfg))


def test_training_opens_the_steady_state_window_after_the_warm_up_steps(checkpoints, tmp_path):
    from distill_bench.train.stage import train_student
    from distill_bench.train.trainer import STEADY_AFTER_STEPS

    meter = FakeMeter()
    summary = train_student(meter=meter, pipeline="sft_gt", dataset=checkpoints["data"],
                            tokenizer=checkpoints["qwen2_tied"], init_model=checkpoints["qwen2_tied"],
                            out_dir=str(tmp_path / "run"), training={**TRAINING, "token_budget": 400}, seed=0)
    assert summary["steps"] > STEADY_AFTER_STEPS and meter.steady_marks == 1


def test_vllm_is_handed_the_pointed_to_model_and_its_configured_tokenizer(checkpoints, tmp_path):
    from distill_bench.generation.vllm_backend import _path_of

    model_dir, _ = _init(checkpoints, "olmo2_no_template", tmp_path, tokenizer=checkpoints["olmo2_untied"])
    assert _path_of(model_dir, "model") == checkpoints["olmo2_no_template"]
    assert _path_of(model_dir, "tokenizer") == checkpoints["olmo2_untied"]
    assert _path_of(checkpoints["qwen2_tied"], "model") == checkpoints["qwen2_tied"]
