"""DPO preference distillation: pairing rule, judge parsing, judges, the three stages and DPO training."""
from __future__ import annotations

import json
import math
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from distill_bench.dpo.config import DEFAULTS, normalize_dpo  # noqa: E402
from distill_bench.dpo.judges import parse_judge_score  # noqa: E402
from distill_bench.dpo.pairs import build_pairs  # noqa: E402
from conftest import FakeMeter  # noqa: E402

TRAINING = {"token_budget": 1, "max_length": 96, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "weight_decay": 0.0,
            "warmup_ratio": 0.0, "lr_scheduler": "constant", "precision": "fp32", "save_steps": 1000,
            "stale_checkpoints": "refuse"}


# --------------------------------------------------------------------------------------------- pairing rule


def _rows(scores_by_prompt):
    return [{"prompt_id": pid, "prompt": f"q{pid}", "response": f"{pid}-r{i}", "score": s, "source": "student",
             "sample_index": i} for pid, scores in scores_by_prompt.items() for i, s in enumerate(scores)]


@pytest.mark.parametrize("margin", [0.0, 0.5, 2.0])
def test_every_pair_beats_its_rejected_by_more_than_the_margin(margin):
    rng = random.Random(7)
    groups = {f"p{k}": [rng.choice([0.0, 0.5, 1.0, 2.0, 3.0, None]) for _ in range(rng.randint(1, 5))]
              for k in range(300)}
    pairs, counts = build_pairs(_rows(groups), margin)
    assert pairs and all(p["chosen_score"] - p["rejected_score"] > margin for p in pairs)
    valid = {pid: [s for s in ss if s is not None] for pid, ss in groups.items()}
    for p in pairs:  # best vs worst of the prompt's valid candidates
        assert p["chosen_score"] == max(valid[p["prompt_id"]]) and p["rejected_score"] == min(valid[p["prompt_id"]])
    prompt_reasons = ("pairs", "dropped_all_equal", "dropped_below_margin", "dropped_single_candidate",
                      "prompts_without_candidates")
    assert sum(counts[k] for k in prompt_reasons) == len(groups)
    assert counts["dropped_malformed_judge_output"] == sum(s is None for ss in groups.values() for s in ss)


def test_ties_and_all_equal_groups_are_dropped_and_counted():
    pairs, counts = build_pairs(_rows({
        "equal": [1.0, 1.0, 1.0],          # all equal
        "tight": [1.0, 1.2, 1.1],          # spread 0.2 <= margin 0.2: a tie at the margin is dropped
        "good": [0.0, 1.0, 1.0, 0.0],      # best ties broken by the first row
        "bad": [None, None],               # every judge output malformed
        "single": [5.0, None],             # one valid candidate left
    }), margin=0.2)
    assert [p["prompt_id"] for p in pairs] == ["good"]
    assert pairs[0]["chosen"] == "good-r1" and pairs[0]["rejected"] == "good-r0"
    assert counts == {"pairs": 1, "dropped_all_equal": 1, "dropped_below_margin": 1, "dropped_single_candidate": 1,
                      "dropped_malformed_judge_output": 3, "prompts_without_candidates": 1}


def test_negative_margin_is_rejected():
    with pytest.raises(ValueError, match="margin"):
        build_pairs([], -1)


# --------------------------------------------------------------------------------------------- judge parser


@pytest.mark.parametrize("text,expected", [
    ("Score: 7", 7.0), ("score=6.5", 6.5), ("I'd say 7/10.", 7.0), ("**8**", 8.0), ("**Score:** 9", 9.0),
    ("SCORE - 3\n", 3.0), ("The score is 10.", 10.0), ("  4 ", 4.0), ("Score: 1", 1.0), ("Score: 7. Good.", 7.0),
])
def test_parse_judge_score_reads_well_formed_replies(text, expected):
    assert parse_judge_score(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", None, 7, "no idea", "Score:", "Score: eleven", "Score: 0", "Score: 15", "Score: -3", "11/10",
    "7/100", "Score: 7 ... actually Score: 3", "The answer is 42", "Score: 1e3", "Score: NaN", "**", "Score: 7.5.3",
    "Rate the answer from 1 to 10",
])
def test_parse_judge_score_returns_none_on_malformed_replies(text):
    assert parse_judge_score(text) is None


# --------------------------------------------------------------------------------------------- config


def test_dpo_config_defaults_and_errors_name_the_key():
    assert normalize_dpo({}) == DEFAULTS
    with pytest.raises(ValueError, match=r"dpo\.bogus"):
        normalize_dpo({"bogus": 1})
    for bad, key in [({"judge": "gpt"}, "dpo.judge"), ({"beta": 0}, "dpo.beta"),
                     ({"temperature": 0.0}, "dpo.temperature"), ({"sample_source": "x"}, "dpo.sample_source"),
                     ({"margin": -0.1}, "dpo.margin"), ({"n_prompts": 0}, "dpo.n_prompts")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            normalize_dpo(bad)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import datasets

    from toy_generation import build_toy_model, build_toy_tokenizer
    from distill_bench.models.build import save_model_dir
    from distill_bench.models.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("dpo")
    tok = build_toy_tokenizer()
    save_tokenizer(tok, root / "tok")
    save_model_dir(build_toy_model(tok, seed=1), root / "teacher", tok)
    save_model_dir(build_toy_model(tok, hidden_size=16, seed=2), root / "student", tok)
    rng = random.Random(0)
    recs = []
    for i in range(12):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        recs.append({"id": f"arith-train-{i}", "prompt": f"what is {a} plus {b}?", "response": f"{a}+{b}={a + b}. #### {a + b}",
                     "answer": str(a + b), "source": "embedded"})
    ev = [dict(recs[0], id="arith-eval-0")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs), "eval": datasets.Dataset.from_list(ev)}) \
        .save_to_disk(str(root / "data"))
    return {"root": root, "tok": tok, "tok_dir": str(root / "tok"), "teacher": str(root / "teacher"),
            "student": str(root / "student"), "data": str(root / "data"), "records": recs}


def _write_candidates(path, rows):
    """A candidates dir as sample_candidates writes it (rows + completion marker)."""
    import datasets

    from distill_bench.dpo.stage import CANDIDATES_INFO

    full = [{"prompt_tokens": 1, "generated_tokens": 1, "finished": True, "source": "student", **r} for r in rows]
    datasets.Dataset.from_list(full).save_to_disk(str(path / "data"))
    ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    (path / CANDIDATES_INFO).write_text(json.dumps({"complete": True, "prompt_ids": ids, "sources": {}}))
    return str(path)


# --------------------------------------------------------------------------------------------- judges


def test_teacher_logprob_is_length_normalised(env):
    import torch

    from distill_bench.dpo.judges import score_teacher_logprob, sequence_logprobs
    from toy_generation import build_toy_model
    from distill_bench.models.tokenizer import encode_prompt_response

    tok = env["tok"]
    model = build_toy_model(tok, seed=3)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution: every token has log-prob -log V
    rows = [{"prompt": "what is 1 plus 2?", "response": "3"},
            {"prompt": "what is 1 plus 2?", "response": "it is 1 plus 2 which makes 3 in total. #### 3"}]
    scores, forwarded = score_teacher_logprob(model, tok, rows, batch_size=2)
    assert scores[0] == pytest.approx(-math.log(len(tok)), abs=1e-5)
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)
    seqs = [encode_prompt_response(tok, r["prompt"], r["response"], None) for r in rows]
    sums = sequence_logprobs(model, seqs, 2, tok.pad_token_id)
    assert sums[1][0] < sums[0][0] - 1.0  # the summed score (the original study's) would prefer the short answer
    assert forwarded == sum(len(s["input_ids"]) for s in seqs)


def test_teacher_logprob_is_padding_invariant(env):
    from distill_bench.dpo.judges import score_teacher_logprob
    from toy_generation import build_toy_model

    model = build_toy_model(env["tok"], seed=4)
    rows = [{"prompt": r["prompt"], "response": r["response"][: 3 + 4 * k]} for k, r in enumerate(env["records"][:6])]
    batched, _ = score_teacher_logprob(model, env["tok"], rows, batch_size=6)
    single = [score_teacher_logprob(model, env["tok"], [r], batch_size=1)[0][0] for r in rows]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1


def test_verifier_scores_task_correctness():
    from distill_bench.dpo.judges import score_verifier

    rows = [{"response": "2+3=5. #### 5", "answer": "5"}, {"response": "so it is 5", "answer": "5"},
            {"response": "#### 6", "answer": "5"}, {"response": "", "answer": "5"}]
    assert score_verifier(rows) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="verifier"):
        score_verifier([{"response": "5", "answer": None, "prompt_id": "x"}])


# --------------------------------------------------------------------------------------------- stages


def test_sample_candidates_counts_tokens_exactly_and_is_reproducible(env, tmp_path):
    import datasets

    from distill_bench.dpo.stage import sample_candidates

    dpo = {"sample_source": "both", "samples_per_prompt": 2, "n_prompts": 3, "max_new_tokens": 6, "batch_size": 4}
    models = {"teacher": env["teacher"], "student": env["student"]}
    outs = []
    for k in range(2):
        meter = FakeMeter()
        info = sample_candidates(meter=meter, models=models, tokenizer=env["tok_dir"], dataset=env["data"],
                                 out_dir=str(tmp_path / f"cand{k}"), dpo=dpo, seed=5)
        ds = datasets.load_from_disk(str(tmp_path / f"cand{k}" / "data"))
        outs.append(ds.to_list())
        assert len(ds) == 3 * 2 * 2 == info["candidates"]
        assert meter.primary == "generated_tokens"
        assert meter.tokens["generated_tokens"] == sum(ds["generated_tokens"]) > 0
        assert meter.tokens["input_tokens"] == sum(ds["prompt_tokens"])
        assert {r["source"] for r in outs[-1]} == {"teacher", "student"}
        assert all(r["answer"] == env["records"][int(r["prompt_id"].rsplit("-", 1)[1])]["answer"] for r in outs[-1])
    assert outs[0] == outs[1]
    assert not (tmp_path / "cand0.partial").exists()
    with pytest.raises(ValueError, match="teacher"):
        sample_candidates(meter=FakeMeter(), models={"student": env["student"]}, tokenizer=env["tok_dir"],
                          dataset=env["data"], out_dir=str(tmp_path / "x"), dpo={**dpo, "sample_source": "both"},
                          seed=5)


def test_dpo_hf_decode_reaches_the_sampling_loop(env, tmp_path, decode_modes):
    from distill_bench.dpo.stage import sample_candidates

    dpo = {"sample_source": "student", "samples_per_prompt": 2, "n_prompts": 2, "max_new_tokens": 4, "batch_size": 4,
           "hf_decode": "graph"}
    sample_candidates(meter=FakeMeter(), models={"student": env["student"]}, tokenizer=env["tok_dir"],
                      dataset=env["data"], out_dir=str(tmp_path / "cand"), dpo=dpo, seed=5)
    assert decode_modes and set(decode_modes) == {"graph"}
    with pytest.raises(ValueError, match="dpo.hf_decode"):
        sample_candidates(meter=FakeMeter(), models={"student": env["student"]}, tokenizer=env["tok_dir"],
                          dataset=env["data"], out_dir=str(tmp_path / "bad"), dpo={**dpo, "hf_decode": "fast"}, seed=5)


def test_dpo_hf_prefill_reaches_the_sampling_loop_and_a_bad_value_names_the_key(env, tmp_path, decode_modes):
    from distill_bench.dpo.stage import sample_candidates

    dpo = {"sample_source": "student", "samples_per_prompt": 2, "n_prompts": 2, "max_new_tokens": 4, "batch_size": 4,
           "hf_decode": "graph", "hf_prefill": "packed"}
    sample_candidates(meter=FakeMeter(), models={"student": env["student"]}, tokenizer=env["tok_dir"],
                      dataset=env["data"], out_dir=str(tmp_path / "cand"), dpo=dpo, seed=5)
    assert decode_modes.prefill and set(decode_modes.prefill) == {"packed"}
    with pytest.raises(ValueError, match="dpo.hf_prefill"):
        sample_candidates(meter=FakeMeter(), models={"student": env["student"]}, tokenizer=env["tok_dir"],
                          dataset=env["data"], out_dir=str(tmp_path / "bad"), dpo={**dpo, "hf_prefill": "fast"},
                          seed=5)


def test_judge_candidates_verifier_writes_pairs_and_counts(env, tmp_path):
    import datasets

    from distill_bench.dpo.stage import JUDGE_INFO, judge_candidates

    rows = [
        {"prompt_id": "a", "prompt": "what is 2 plus 3?", "answer": "5", "sample_index": 0, "response": "#### 5"},
        {"prompt_id": "a", "prompt": "what is 2 plus 3?", "answer": "5", "sample_index": 1, "response": "#### 4"},
        {"prompt_id": "b", "prompt": "what is 1 plus 1?", "answer": "2", "sample_index": 0, "response": "#### 3"},
        {"prompt_id": "b", "prompt": "what is 1 plus 1?", "answer": "2", "sample_index": 1, "response": "#### 4"},
    ]
    cand = _write_candidates(tmp_path / "cand", rows)
    meter = FakeMeter()
    info = judge_candidates(meter=meter, candidates=cand, out_dir=str(tmp_path / "pairs"), dpo={"judge": "verifier"},
                            judge_model=None, tokenizer=env["tok_dir"], seed=0)
    ds = datasets.load_from_disk(str(tmp_path / "pairs"))["train"]
    pair = ds.to_list()[0]
    assert len(ds) == 1 and {k: pair[k] for k in ("prompt_id", "chosen", "rejected", "chosen_score", "rejected_score")} \
        == {"prompt_id": "a", "chosen": "#### 5", "rejected": "#### 4", "chosen_score": 1.0, "rejected_score": 0.0}
    assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "prompt_id"} <= set(ds.column_names)
    assert meter.metrics["pairs"] == 1 and meter.metrics["dropped_all_equal"] == 1
    assert meter.tokens["judged_candidates"] == 4 and meter.primary == "judged_candidates"
    assert json.loads((tmp_path / "pairs" / JUDGE_INFO).read_text())["counts"] == info["counts"]


def test_no_surviving_pair_is_an_error_naming_judge_and_margin(env, tmp_path):
    from distill_bench.dpo.stage import judge_candidates

    rows = [{"prompt_id": "a", "prompt": "what is 2 plus 3?", "answer": "5", "sample_index": i,
             "response": f"#### {i}"} for i in range(3)]
    cand = _write_candidates(tmp_path / "cand", rows)
    with pytest.raises(ValueError, match=r"judge 'verifier' with margin 0\.5"):
        judge_candidates(meter=FakeMeter(), candidates=cand, out_dir=str(tmp_path / "pairs"),
                         dpo={"judge": "verifier", "margin": 0.5}, judge_model=None, tokenizer=env["tok_dir"], seed=0)
    assert not (tmp_path / "pairs").exists()


def test_llm_judge_reads_its_own_tokenizer_and_drops_equal_scores(env, tmp_path):
    """A chain model that always replies 'Score: 7': every candidate parses, all equal -> no pair, clear error."""
    from distill_bench.dpo.stage import judge_candidates
    from toy_generation import ASSISTANT, EOS, build_chain_model
    from distill_bench.models.build import save_model_dir

    tok = env["tok"]
    reply = list("Score: 7")
    chain = {ASSISTANT: reply[0], **{a: b for a, b in zip(reply, reply[1:])}, reply[-1]: EOS}
    save_model_dir(build_chain_model(tok, chain), tmp_path / "judge", tok)
    rows = [{"prompt_id": "a", "prompt": "what is 2 plus 3?", "answer": "5", "sample_index": i,
             "response": f"#### {i}"} for i in range(2)]
    cand = _write_candidates(tmp_path / "cand", rows)
    meter = FakeMeter()
    with pytest.raises(ValueError, match=r"judge 'llm' with margin 0\.0"):
        judge_candidates(meter=meter, candidates=cand, out_dir=str(tmp_path / "pairs"), dpo={"judge": "llm"},
                         judge_model=str(tmp_path / "judge"), tokenizer="/nonexistent-run-tokenizer", seed=0)
    assert meter.metrics["dropped_all_equal"] == 1 and meter.metrics["dropped_malformed_judge_output"] == 0
    assert meter.tokens["generated_tokens"] == 2 * (len(reply) + 1) and meter.tokens["input_tokens"] > 0


def test_sample_judge_train_pipeline_with_fake_meter(env, tmp_path):
    import datasets

    from distill_bench.dpo.stage import judge_candidates, sample_candidates
    from distill_bench.dpo.train import train_dpo

    dpo = {"sample_source": "student", "samples_per_prompt": 3, "n_prompts": 6, "max_new_tokens": 8,
           "batch_size": 8, "judge": "teacher_logprob"}
    sample_candidates(meter=FakeMeter(), models={"student": env["student"]}, tokenizer=env["tok_dir"],
                      dataset=env["data"], out_dir=str(tmp_path / "cand"), dpo=dpo, seed=1)
    jm = FakeMeter()
    judge_candidates(meter=jm, candidates=str(tmp_path / "cand"), out_dir=str(tmp_path / "pairs"), dpo=dpo,
                     judge_model=env["teacher"], tokenizer=env["tok_dir"], seed=1)
    assert jm.metrics["pairs"] >= 1 and jm.tokens["input_tokens"] > 0
    pairs = datasets.load_from_disk(str(tmp_path / "pairs"))["train"]
    assert all(c > r for c, r in zip(pairs["chosen_score"], pairs["rejected_score"]))

    tm = FakeMeter()
    summary = train_dpo(meter=tm, pairs=str(tmp_path / "pairs"), tokenizer=env["tok_dir"], init_model=env["student"],
                        out_dir=str(tmp_path / "dpo"), dpo={**dpo, "epochs": 2}, training=TRAINING, seed=1)
    assert (tmp_path / "dpo" / "final" / "config.json").is_file()
    assert (tmp_path / "dpo" / "final" / "tokenizer_config.json").is_file()
    assert not (tmp_path / "dpo" / "checkpoints").exists()
    assert tm.primary == "trained_tokens"
    assert tm.tokens["trained_tokens"] == tm.metrics["declared_token_budget"] == summary["declared_token_budget"]
    assert tm.metrics["pairs"] == len(pairs) and tm.metrics["epochs"] == 2
    assert tm.tokens["input_tokens"] > tm.tokens["trained_tokens"]  # the prompt is forwarded with both responses
    assert tm.metrics["reward_accuracy_final"] is not None and tm.metrics["loss_curve"]


# --------------------------------------------------------------------------------------------- DPO training


def _systematic_pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt_id": str(i), "prompt": f"what is {a} plus {b}?", "chosen": f"{a}+{b}={a + b}. #### {a + b}",
                    "rejected": "no idea, sorry", "chosen_score": 1.0, "rejected_score": 0.0})
    return out


def _save_pairs(path, rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return str(path)


def test_dpo_raises_implicit_reward_accuracy_on_its_training_pairs(env, tmp_path, capsys, monkeypatch):
    """With the clip folded into fused AdamW, as the SFT and KD trainers, its gradient norm is the logged one (HF's
    clip_grad_norm_ never runs)."""
    import torch

    from distill_bench.dpo.train import implicit_rewards, train_dpo
    from distill_bench.models.build import load_model

    rows = _systematic_pairs(12)
    pairs = _save_pairs(tmp_path / "pairs", rows)
    init = load_model(env["student"])
    before = implicit_rewards(init, load_model(env["student"]), env["tok"], rows, beta=0.1)
    meter = FakeMeter()
    hf_clips = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: hf_clips.append(1) or clip(*a, **k))
    train_dpo(meter=meter, pairs=pairs, tokenizer=env["tok_dir"], init_model=env["student"],
              out_dir=str(tmp_path / "dpo"), dpo={"epochs": 2, "beta": 0.1},
              training={**TRAINING, "optim": "adamw_fused_clip"}, seed=0)
    assert hf_clips == []
    assert json.loads((tmp_path / "dpo" / "train_log.json").read_text())["optim"] == "adamw_fused_clip"
    assert meter.metrics["optim"] == "adamw_fused_clip"   # the stage record names it too
    after = implicit_rewards(load_model(tmp_path / "dpo" / "final"), init, env["tok"], rows, beta=0.1)
    with capsys.disabled():
        print(f"\n[dpo] implicit reward accuracy before {before['accuracy']:.3f} after {after['accuracy']:.3f} "
              f"(margin {before['margin_mean']:.4f} -> {after['margin_mean']:.4f}); trainer's last logged "
              f"rewards/accuracies {meter.metrics['reward_accuracy_final']:.3f}")
    assert before["accuracy"] == 0.0 and before["margin_mean"] == 0.0  # policy == reference: no preference yet
    assert after["accuracy"] >= 0.9 and after["margin_mean"] > 0
    assert meter.metrics["reward_accuracy_final"] >= 0.75
    assert meter.metrics["steps"] == 2 * 3


def test_reference_with_another_tokenizer_is_refused(env, tmp_path):
    from distill_bench.dpo.train import train_dpo
    from toy_generation import build_toy_model
    from toy_kd import tiny_tokenizer
    from distill_bench.models.build import save_model_dir
    from distill_bench.models.tokenizer import TokenizerMismatchError

    other = tiny_tokenizer()
    save_model_dir(build_toy_model(other, hidden_size=16), tmp_path / "other", other)
    pairs = _save_pairs(tmp_path / "pairs", _systematic_pairs(2))
    with pytest.raises(TokenizerMismatchError, match="DPO reference"):
        train_dpo(meter=FakeMeter(), pairs=pairs, tokenizer=env["tok_dir"], init_model=str(tmp_path / "other"),
                  out_dir=str(tmp_path / "dpo"), dpo={}, training=TRAINING, seed=0)
    assert not (tmp_path / "dpo" / "final").exists()


def test_precomputed_reference_logprobs_are_consumed_by_training(env, tmp_path):
    import datasets

    from distill_bench.dpo.judges import sequence_logprobs
    from distill_bench.dpo.stage import precompute_reference
    from distill_bench.dpo.train import train_dpo
    from distill_bench.models.build import load_model
    from distill_bench.models.tokenizer import encode_prompt_response

    rows = _systematic_pairs(8, seed=1)
    pairs = _save_pairs(tmp_path / "pairs", rows)
    dpo = {"precompute_ref_logprobs": True, "epochs": 1}
    with pytest.raises(ValueError, match="precompute_reference"):
        train_dpo(meter=FakeMeter(), pairs=pairs, tokenizer=env["tok_dir"], init_model=env["student"],
                  out_dir=str(tmp_path / "dpo0"), dpo=dpo, training=TRAINING, seed=0)
    pm = FakeMeter()
    precompute_reference(meter=pm, pairs=pairs, tokenizer=env["tok_dir"], init_model=env["student"],
                         out_dir=str(tmp_path / "ref"), dpo=dpo, training=TRAINING, seed=0)
    ref = datasets.load_from_disk(str(tmp_path / "ref"))["train"]
    seq = encode_prompt_response(env["tok"], rows[0]["prompt"], rows[0]["chosen"], None)
    expect = sequence_logprobs(load_model(env["student"]), [seq], 1, env["tok"].pad_token_id)[0][0]
    assert ref[0]["ref_chosen_logps"] == pytest.approx(expect, abs=1e-4)
    assert pm.primary == "input_tokens" and pm.tokens["input_tokens"] > 0
    tm = FakeMeter()
    summary = train_dpo(meter=tm, pairs=str(tmp_path / "ref"), tokenizer=env["tok_dir"], init_model=env["student"],
                        out_dir=str(tmp_path / "dpo"), dpo=dpo, training=TRAINING, seed=0)
    assert summary["trained_tokens"] == summary["declared_token_budget"]
    # first logged step: policy == reference, so TRL's implicit rewards start at 0 only if it used our ref values
    first = next(e for e in summary["reward_margin_curve"])
    assert abs(first[1]) < 1e-3


def test_checkpoint_of_another_run_is_not_resumed(env, tmp_path):
    from distill_bench.dpo.train import train_dpo
    from distill_bench.train.trainer import CheckpointMismatchError

    pairs = _save_pairs(tmp_path / "pairs", _systematic_pairs(4))
    ckpt = tmp_path / "dpo" / "checkpoints"
    (ckpt / "checkpoint-1").mkdir(parents=True)
    (ckpt / "run_fingerprint.json").write_text(json.dumps({"settings": "x", "seed": "0", "stream": "y",
                                                           "model_config": "z", "trainer": "DPOTrainer",
                                                           "extra": "w"}))
    with pytest.raises(CheckpointMismatchError, match="refusing to mix runs"):
        train_dpo(meter=FakeMeter(), pairs=pairs, tokenizer=env["tok_dir"], init_model=env["student"],
                  out_dir=str(tmp_path / "dpo"), dpo={}, training=TRAINING, seed=0)


def test_dpo_on_two_processes_goes_through_the_launch_and_counts_tokens_once(env, tmp_path, monkeypatch):
    """DPO takes the same torchrun launch as SFT and KD (2 gloo processes on CPU): the launching meter gets the
    declared tokens once (rank 0 reports the all-reduced tally), and the loss matches one process's."""
    from distill_bench.train.stage import train_student as stage

    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    pairs = _save_pairs(tmp_path / "pairs", _systematic_pairs(8))
    common = dict(pipeline="dpo", dataset=pairs, tokenizer=env["tok_dir"], init_model=env["student"],
                  dpo={"epochs": 1, "beta": 0.1}, seed=0)
    one, two = FakeMeter(), FakeMeter()
    s1 = stage(meter=one, out_dir=str(tmp_path / "one"), training={**TRAINING, "batch_size": 4, "logging_steps": 1},
               **common)
    s2 = stage(meter=two, out_dir=str(tmp_path / "two"),
               training={**TRAINING, "batch_size": 2, "gpus": 2, "logging_steps": 1}, **common)
    assert "torch.distributed.run" in two.metrics["launch_command"]
    assert two.metrics["distributed"]["world_size"] == 2
    assert two.metrics["speed"]["world_size"] == 2 and two.metrics["speed"]["window_steps"] >= 1
    declared = s1["declared_token_budget"]
    assert s2["trained_tokens"] == declared == s1["trained_tokens"]
    assert one.tokens["trained_tokens"] == two.tokens["trained_tokens"] == declared
    assert two.metrics["trained_tokens_total"] == declared
    assert s1["steps"] == s2["steps"] == 2
    assert [v for _, v in s2["loss_curve"]] == pytest.approx([v for _, v in s1["loss_curve"]], rel=1e-4)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
