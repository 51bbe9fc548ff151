"""The evaluate stage on a tiny hand-checkable model: native and lm-eval backends, result JSON, bad input."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from distill_bench.eval.stage import evaluate  # noqa: E402
from toy_generation import build_chain_model, build_toy_tokenizer  # noqa: E402
from conftest import FakeMeter  # noqa: E402

ANSWERS = ["7", "7", "3", "10"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A model that always answers '7' then EOS, its tokenizer, and a 4-item eval split (two golds are 7)."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("eval")
    tok = build_toy_tokenizer()
    model = build_chain_model(tok, {"<|assistant|>": "7", "7": "</s>"})
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tok.save_pretrained(root / "tokenizer")
    rows = [{"id": f"arith-eval-{i}", "prompt": f"What is {a} plus 0?", "response": f"{a} + 0 = {a}\n#### {a}",
             "answer": a, "source": "embedded"} for i, a in enumerate(ANSWERS)]
    DatasetDict({"train": Dataset.from_list(rows[:1]), "eval": Dataset.from_list(rows)}).save_to_disk(root / "data")
    return root


def _eval_cfg(**kw):
    return {"backend": "native", "max_new_tokens": 8, "batch_size": 3, "bootstrap_samples": 200,
            "confidence": 0.95, **kw}


def test_native_evaluate_writes_valid_result_json_with_exact_counts(workdir):
    meter = FakeMeter()
    out = workdir / "eval" / "student" / "arith.json"
    evaluate(meter=meter, model=str(workdir / "model"), tokenizer=str(workdir / "tokenizer"),
             dataset=str(workdir / "data"), out_json=str(out), eval=_eval_cfg(), model_id="student", seed=1)
    result = json.loads(out.read_text())
    assert result["backend"] == "native" and result["model_id"] == "student" and result["n"] == 4
    strict, flex = result["metrics"]["strict_match"], result["metrics"]["flexible_extract"]
    assert strict["value"] == 0.0  # '7' has no '#### '
    assert flex["value"] == 0.5    # two of four golds are 7
    assert flex["ci_low"] <= 0.5 <= flex["ci_high"] and flex["stderr"] > 0
    # every answer is '7' + EOS = 2 generated tokens; prompts "<s><|user|>What is 7 plus 0?<|assistant|>" = 20/21
    assert meter.tokens["generated_tokens"] == 8 and meter.primary == "generated_tokens"
    assert meter.tokens["input_tokens"] == 20 + 20 + 20 + 21
    samples = [json.loads(line) for line in (out.parent / "arith.samples.jsonl").read_text().splitlines()]
    assert [s["output"] for s in samples] == ["7"] * 4
    assert [s["flexible_correct"] for s in samples] == [True, True, False, False]
    assert not list(out.parent.glob("*.tmp"))


def test_lm_eval_backend_runs_embedded_task_offline_and_agrees_with_native(workdir):
    meter = FakeMeter()
    out = workdir / "eval" / "student" / "arith.lm_eval.json"
    evaluate(meter=meter, model=str(workdir / "model"), tokenizer=str(workdir / "tokenizer"),
             dataset=str(workdir / "data"), out_json=str(out), eval=_eval_cfg(backend="lm_eval"),
             model_id="student", seed=1, task="distill_arith")
    result = json.loads(out.read_text())
    assert result["backend"] == "lm_eval" and result["harness_version"] and result["n"] == 4
    task = result["tasks"]["distill_arith"]
    assert len(task["config_hash"]) == 16
    assert result["metrics"]["strict_match"]["value"] == 0.0
    assert result["metrics"]["flexible_extract"]["value"] == 0.5
    assert result["metrics"]["flexible_extract"]["stderr"] > 0
    assert meter.tokens["generated_tokens"] == 8  # '7' + EOS per item, padding excluded
    assert meter.records["loglikelihood_requests"] == 0 and meter.records["generate_requests"] == 4
    # per-item results, keyed by the same ids as the native backend's, so the paired statistics work with both
    samples = [json.loads(line) for line in (out.parent / "arith.lm_eval.samples.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in samples) == [f"arith-eval-{i}" for i in range(4)]
    flexible = {s["id"]: s["flexible_correct"] for s in samples}
    # the native backend's verdicts on the same items (its test above): golds 7, 7, 3, 10 against the answer 7
    assert flexible == {"arith-eval-0": True, "arith-eval-1": True, "arith-eval-2": False, "arith-eval-3": False}
    flex = result["metrics"]["flexible_extract"]
    assert 0.0 <= flex["ci_low"] <= 0.5 <= flex["ci_high"] <= 1.0 and flex["ci_method"].startswith("bootstrap")


def test_lm_eval_interval_respects_the_bounds_and_the_exact_confidence():
    """1 correct in 100: a normal interval would reach below 0 (the bug: [-1.0, 3.0] %); the bootstrap over the
    per-item results cannot. Without per-item results z comes from the exact confidence, not a rounded one."""
    from distill_bench.eval.lm_eval_backend import _metrics, per_item_scores

    samples = [{"doc_id": i, "doc": {"id": f"q{i}"}, "filter": filt, "metrics": ["exact_match"],
                "exact_match": float(i == 0)} for i in range(100) for filt in ("strict-match", "flexible-extract")]
    items = per_item_scores(samples)
    assert set(items) == {"strict_match", "flexible_extract"} and items["strict_match"]["q0"] == 1.0
    res = {"exact_match,strict-match": 0.01, "exact_match_stderr,strict-match": 0.01}
    strict = _metrics(res, 0.95, items, 1000, 0)["strict_match"]
    assert 0.0 <= strict["ci_low"] <= 0.01 <= strict["ci_high"] <= 1.0
    normal = _metrics({"acc,none": 0.5, "acc_stderr,none": 0.1}, 0.954)["acc,none"]
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + 0.954 / 2)   # 1.995, where rounding to 0.95 gave 1.960
    assert normal["ci_high"] == pytest.approx(0.5 + z * 0.1, rel=1e-12)


@pytest.mark.parametrize("where", ["task", "eval.tasks"])
def test_unknown_lm_eval_task_lists_close_matches_before_loading_any_model(workdir, where):
    kw = {"task": "gsm8kk"} if where == "task" else {"eval": _eval_cfg(backend="lm_eval", tasks=["mmlu", "gsm8kk"])}
    # the model path does not exist: the task check must come first
    with pytest.raises(ValueError, match=r"unknown lm-eval task.*'gsm8kk'.*close matches: .*gsm8k"):
        evaluate(**{"meter": FakeMeter(), "model": str(workdir / "no-such-model"), "tokenizer": None,
                    "dataset": str(workdir / "data"), "out_json": str(workdir / "x.json"),
                    "eval": _eval_cfg(backend="lm_eval"), "model_id": "m", "seed": 1, **kw})


def test_standard_task_without_offline_data_fails_fast_with_clear_message(workdir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(workdir / "empty_hf_home"))  # nothing cached
    with pytest.raises(RuntimeError, match=r"task 'gsm8k'.*not in the local HF cache"):
        evaluate(meter=FakeMeter(), model=str(workdir / "model"), tokenizer=str(workdir / "tokenizer"),
                 dataset=str(workdir / "data"), out_json=str(workdir / "y.json"),
                 eval=_eval_cfg(backend="lm_eval"), model_id="m", seed=1, task="gsm8k")


@pytest.mark.parametrize("cfg, key", [(_eval_cfg(backend="helm"), "eval.backend"),
                                      (_eval_cfg(batch_size=0), "eval.batch_size"),
                                      (_eval_cfg(confidence=1.2), "eval.confidence"),
                                      (_eval_cfg(limitt=3), "eval.limitt"),
                                      (_eval_cfg(tasks="gsm8k"), "eval.tasks")])
def test_bad_eval_config_names_the_key(workdir, cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        evaluate(meter=FakeMeter(), model=str(workdir / "model"), tokenizer=str(workdir / "tokenizer"),
                 dataset=str(workdir / "data"), out_json=str(workdir / "z.json"), eval=cfg, model_id="m", seed=1)


def test_model_dir_without_tokenizer_is_a_clear_error(workdir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(workdir / "model", bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    (bare / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        evaluate(meter=FakeMeter(), model=str(bare), tokenizer=None, dataset=str(workdir / "data"),
                 out_json=str(tmp_path / "r.json"), eval=_eval_cfg(), model_id="m", seed=1)


def test_missing_split_is_named(workdir):
    with pytest.raises(KeyError, match="no split 'test'"):
        evaluate(meter=FakeMeter(), model=str(workdir / "model"), tokenizer=str(workdir / "tokenizer"),
                 dataset=str(workdir / "data"), out_json=str(workdir / "w.json"), eval=_eval_cfg(), model_id="m",
                 seed=1, split="test")


def test_gsm8k_dataset_evaluates_through_lm_evals_own_gsm8k_task_offline(workdir, tmp_path):
    """A GSM8K-source dataset (rows in GSM8K's layout) under eval.backend lm_eval runs lm-eval's gsm8k task config
    (its prompt, stops, filters and metric) on our eval rows; the scores agree with the native evaluator's."""
    from datasets import Dataset, DatasetDict

    rows = [{"id": f"gsm8k-test-{i}", "prompt": f"Tom has {a} apples and gets 0 more. How many apples?",
             "response": f"He has {a}+0=<<{a}+0={a}>>{a} apples.\n#### {a}", "answer": a, "source": "gsm8k"}
            for i, a in enumerate(ANSWERS)]
    DatasetDict({"train": Dataset.from_list(rows[:1]), "eval": Dataset.from_list(rows)}).save_to_disk(tmp_path / "d")
    results = {}
    for backend in ("lm_eval", "native"):
        evaluate(meter=FakeMeter(), model=str(workdir / "model"), tokenizer=str(workdir / "tokenizer"),
                 dataset=str(tmp_path / "d"), out_json=str(tmp_path / f"{backend}.json"),
                 eval=_eval_cfg(backend=backend), model_id="student", seed=1)
        results[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    assert list(results["lm_eval"]["tasks"]) == ["distill_gsm8k"] and results["lm_eval"]["n"] == 4
    for key in ("strict_match", "flexible_extract"):
        assert results["lm_eval"]["metrics"][key]["value"] == results["native"]["metrics"][key]["value"]
    assert results["native"]["metrics"]["flexible_extract"]["value"] == 0.5
    samples = [json.loads(x) for x in (tmp_path / "lm_eval.samples.jsonl").read_text().splitlines()]
    assert samples[0]["target"].endswith("#### 7")            # the worked solution is the gold, as in gsm8k


def test_local_gsm8k_task_is_lm_evals_gsm8k_yaml_but_for_data_and_shots():
    from pathlib import Path

    import lm_eval
    import yaml

    from distill_bench.eval.lm_eval_backend import TASK_DIR

    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    ours = yaml.safe_load((TASK_DIR / "distill_gsm8k.yaml").read_text())
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "fewshot_split",
                 "test_split", "doc_to_text", "doc_to_target", "num_fewshot", "generation_kwargs"}
    assert {k: v for k, v in ours.items() if k not in data_keys} == \
        {k: v for k, v in theirs.items() if k not in data_keys}
    gen = {k: v for k, v in ours["generation_kwargs"].items() if k != "max_gen_toks"}
    assert gen == theirs["generation_kwargs"]
    assert ours["doc_to_text"] == theirs["doc_to_text"].replace("question", "prompt")
    assert ours["doc_to_target"] == theirs["doc_to_target"].replace("answer", "response")
