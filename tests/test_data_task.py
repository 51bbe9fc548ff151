"""Embedded task generator: determinism, disjoint splits, and a worked solution that actually checks out."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import re

import pytest

from distill_bench.data.task import MAX_RESULT, generate_task, normalize_prompt

LINE = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")


def _records(dsd):
    return {split: [dict(r) for r in dsd[split]] for split in dsd}


def test_same_seed_gives_identical_records():
    a = generate_task(seed=7, n_train=200, n_eval=50)
    b = generate_task(seed=7, n_train=200, n_eval=50)
    assert _records(a) == _records(b)


def test_different_seed_gives_different_records():
    a = generate_task(seed=7, n_train=100, n_eval=20)
    b = generate_task(seed=8, n_train=100, n_eval=20)
    assert a["train"]["prompt"] != b["train"]["prompt"]
    assert a["eval"]["prompt"] != b["eval"]["prompt"]


def test_eval_split_does_not_depend_on_train_size():
    small = generate_task(seed=3, n_train=10, n_eval=40)
    large = generate_task(seed=3, n_train=500, n_eval=40)
    assert small["eval"]["prompt"] == large["eval"]["prompt"]


def test_splits_are_disjoint_and_deduplicated():
    # a small operand range makes collisions frequent, so dedup/exclusion really has work to do
    dsd = generate_task(seed=1, n_train=1500, n_eval=300, max_operand=5, min_steps=2, max_steps=2)
    train = [normalize_prompt(p) for p in dsd["train"]["prompt"]]
    ev = [normalize_prompt(p) for p in dsd["eval"]["prompt"]]
    assert len(train) == 1500 and len(ev) == 300
    assert len(set(train)) == len(train) and len(set(ev)) == len(ev)
    assert not set(train) & set(ev)


def test_schema_ids_and_source():
    dsd = generate_task(seed=1, n_train=5, n_eval=3, name="arith")
    assert list(dsd) == ["train", "eval"]
    assert dsd["train"].column_names == ["id", "prompt", "response", "answer", "source"]
    assert dsd["train"]["id"] == [f"arith-train-{i}" for i in range(5)]
    assert set(dsd["eval"]["source"]) == {"embedded"}


@pytest.mark.parametrize("ops", [("+", "-"), ("+", "-", "*")])
def test_every_step_is_correct_and_ends_with_answer(ops):
    dsd = generate_task(seed=11, n_train=400, n_eval=100, min_steps=2, max_steps=4, max_operand=30, ops=ops)
    for row in list(dsd["train"]) + list(dsd["eval"]):
        lines = row["response"].split("\n")
        assert lines[-1] == f"#### {row['answer']}"
        steps = lines[:-1]
        assert 2 <= len(steps) <= 4
        start = int(re.search(r" has (\d+) ", row["prompt"]).group(1))
        value = start
        for line in steps:
            m = LINE.match(line)
            assert m, line
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a == value, (row["prompt"], row["response"])
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert 0 <= c <= MAX_RESULT
            if op != "*":
                assert re.search(rf"\b{b}\b", row["prompt"]), (b, row["prompt"])
            value = c
        assert int(row["answer"]) == value >= 0


def test_multiplication_only_when_asked():
    dsd = generate_task(seed=5, n_train=300, n_eval=0, ops=("+", "-"))
    assert not any("*" in r for r in dsd["train"]["response"])
    dsd = generate_task(seed=5, n_train=300, n_eval=0, ops=("+", "-", "x"))
    assert any(" * " in r for r in dsd["train"]["response"])


def test_texts_stay_short_for_tiny_models():
    dsd = generate_task(seed=1234, n_train=500, n_eval=50)
    for row in dsd["train"]:
        assert len(row["prompt"].split()) <= 30
        assert len(row["response"].split("\n")) <= 10


@pytest.mark.parametrize("kwargs, key", [
    (dict(min_steps=3, max_steps=2), "max_steps"),
    (dict(ops=("/",)), "ops"),
    (dict(ops=()), "ops"),
    (dict(max_operand=0), "max_operand"),
    (dict(n_train=-1), "n_train"),
])
def test_bad_parameters_name_the_key(kwargs, key):
    args = dict(seed=1, n_train=5, n_eval=2) | kwargs
    with pytest.raises(ValueError, match=key):
        generate_task(**args)


def test_too_small_task_space_fails_instead_of_looping():
    with pytest.raises(ValueError, match="distinct problems"):
        generate_task(seed=1, n_train=100000, n_eval=0, max_operand=1, min_steps=2, max_steps=2)
