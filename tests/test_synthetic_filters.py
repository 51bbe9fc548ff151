"""Filters on teacher generations (counts, attribution order, errors) and the synthetic artifact ids."""
from __future__ import annotations

import pytest

from distill_bench.synthetic.filters import ORDER, NoSurvivorsError, apply_filters
from distill_bench.synthetic.ids import generation_shard_key, synthetic_artifact_id


def rec(prompt="p", response="1 + 1 = 2\n#### 2", answer="2", tokens=5, finished=True):
    return {"prompt": prompt, "response": response, "answer": answer, "generated_tokens": tokens,
            "finished": finished}


def test_no_filters_keep_everything_and_list_no_reasons():
    records = [rec(), rec(), rec(tokens=0, finished=False)]
    kept, counts = apply_filters(records, {})
    assert kept == records
    assert counts == {"input": 3, "kept": 3, "dropped": {}}


def test_drop_truncated_drops_only_unfinished():
    records = [rec(finished=False), rec(response="a"), rec(response="b", finished=False)]
    kept, counts = apply_filters(records, {"drop_truncated": True})
    assert [r["response"] for r in kept] == ["a"]
    assert counts == {"input": 3, "kept": 1, "dropped": {"drop_truncated": 2}}


def test_min_and_max_tokens_bounds_are_inclusive():
    records = [rec(response=str(n), tokens=n) for n in (1, 2, 3, 4, 5)]
    kept, counts = apply_filters(records, {"min_tokens": 2, "max_tokens": 4})
    assert [r["generated_tokens"] for r in kept] == [2, 3, 4]
    assert counts["dropped"] == {"min_tokens": 1, "max_tokens": 1}


def test_dedup_per_prompt_keeps_first_copy_but_allows_same_response_for_other_prompts():
    records = [rec("p1", "x"), rec("p1", "x"), rec("p1", "y"), rec("p2", "x")]
    kept, counts = apply_filters(records, {"dedup": True})
    assert [(r["prompt"], r["response"]) for r in kept] == [("p1", "x"), ("p1", "y"), ("p2", "x")]
    assert counts["dropped"] == {"dedup": 1}


def test_dedup_global_drops_same_response_across_prompts():
    records = [rec("p1", "x"), rec("p2", "x"), rec("p3", "z")]
    kept, counts = apply_filters(records, {"dedup": "global"})
    assert [r["prompt"] for r in kept] == ["p1", "p3"]
    assert counts["dropped"] == {"dedup": 1}


def test_verify_answer_keeps_only_correct_final_answers():
    records = [rec(response="3 + 4 = 7\n#### 7", answer="7"),
               rec(response="3 + 4 = 8\n#### 8", answer="7"),
               rec(response="3 + 4 = 7", answer="7"),            # no '####' line: strict extraction fails
               rec(response="2 * 500 = 1000\n#### 1,000", answer="1000")]
    kept, counts = apply_filters(records, {"verify_answer": True})
    assert [r["response"].split("#### ")[-1] for r in kept] == ["7", "1,000"]
    assert counts == {"input": 4, "kept": 2, "dropped": {"verify_answer": 2}}


def test_verify_answer_flexible_accepts_last_number():
    kept, _ = apply_filters([rec(response="so the answer is 7", answer="7")], {"verify_answer": "flexible"})
    assert len(kept) == 1


def test_verify_answer_without_reference_answers_is_an_error():
    with pytest.raises(ValueError, match="synthetic.filters.verify_answer"):
        apply_filters([rec(answer=None)], {"verify_answer": True})


def test_each_drop_is_charged_to_the_first_filter_in_order():
    # unfinished AND too short AND wrong AND duplicate: charged to drop_truncated only
    records = [rec("p", "#### 1", answer="2", tokens=1, finished=True),
               rec("p", "#### 1", answer="2", tokens=1, finished=False),
               rec("p", "#### 2", answer="2", tokens=1, finished=True),     # too short
               rec("p", "#### 3", answer="2", tokens=9, finished=True),     # too long
               rec("p", "#### 5", answer="2", tokens=4, finished=True),     # wrong
               rec("p", "#### 2 ", answer="2", tokens=4, finished=True),    # kept
               rec("p", "#### 2 ", answer="2", tokens=4, finished=True)]    # duplicate of the kept one
    filters = {"drop_truncated": True, "min_tokens": 2, "max_tokens": 8, "dedup": True, "verify_answer": True}
    kept, counts = apply_filters(records, filters)
    assert len(kept) == 1
    assert counts["dropped"] == {"drop_truncated": 1, "min_tokens": 2, "max_tokens": 1, "verify_answer": 1,
                                 "dedup": 1}
    assert list(counts["dropped"]) == list(ORDER)
    assert counts["input"] - counts["kept"] == sum(counts["dropped"].values())


def test_dedup_runs_after_verification_so_a_correct_copy_survives():
    # same text for two prompts: wrong for p1, right for p2; verification first keeps p2's copy
    records = [rec("p1", "#### 4", answer="5"), rec("p2", "#### 4", answer="4")]
    kept, counts = apply_filters(records, {"dedup": "global", "verify_answer": True})
    assert [r["prompt"] for r in kept] == ["p2"]
    assert counts["dropped"] == {"verify_answer": 1, "dedup": 0}


def test_zero_survivors_names_the_filter_that_removed_the_last_samples():
    records = [rec(finished=False), rec(tokens=1), rec(tokens=1)]
    with pytest.raises(NoSurvivorsError, match=r"synthetic\.filters\.min_tokens removed the last"):
        apply_filters(records, {"drop_truncated": True, "min_tokens": 3})


def test_zero_survivors_from_the_first_filter_names_it():
    with pytest.raises(NoSurvivorsError, match=r"synthetic\.filters\.drop_truncated"):
        apply_filters([rec(finished=False)] * 3, {"drop_truncated": True, "min_tokens": 1})


def test_empty_input_is_a_clear_error():
    with pytest.raises(NoSurvivorsError, match="shards are empty"):
        apply_filters([], {"drop_truncated": True})


def test_unknown_filter_key_is_named():
    with pytest.raises(ValueError, match=r"synthetic\.filters\.min_length"):
        apply_filters([rec()], {"min_length": 3})


@pytest.mark.parametrize("key,value", [("min_tokens", -1), ("max_tokens", 0), ("drop_truncated", "yes"),
                                       ("dedup", "fuzzy"), ("verify_answer", "loose")])
def test_bad_filter_value_is_named(key, value):
    with pytest.raises(ValueError, match=rf"synthetic\.filters\.{key}"):
        apply_filters([rec()], {key: value})


BASE = {"backend": "auto", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 96, "samples_per_prompt": 1,
        "batch_size": 128, "shards": 2, "n_prompts": None,
        "filters": {"min_tokens": 1, "max_tokens": None, "drop_truncated": True, "dedup": True,
                    "verify_answer": False}}


def test_artifact_id_is_stable_and_readable():
    a = synthetic_artifact_id("arith", BASE)
    assert a == synthetic_artifact_id("arith", dict(BASE))
    assert a.startswith("arith-t0-p1-n96-s1-") and len(a.rsplit("-", 1)[1]) == 8


@pytest.mark.parametrize("key,value", [("temperature", 0.7), ("max_new_tokens", 64), ("samples_per_prompt", 2),
                                       ("n_prompts", 100), ("batch_size", 64), ("backend", "hf")])
def test_decoding_change_changes_both_ids(key, value):
    changed = {**BASE, key: value}
    if key == "samples_per_prompt":
        changed["temperature"] = 0.7
    assert synthetic_artifact_id("arith", changed) != synthetic_artifact_id("arith", BASE)
    assert generation_shard_key("arith", changed) != generation_shard_key("arith", BASE)


def test_filter_change_changes_artifact_id_but_reuses_shards():
    changed = {**BASE, "filters": {**BASE["filters"], "verify_answer": True}}
    assert synthetic_artifact_id("arith", changed) != synthetic_artifact_id("arith", BASE)
    assert generation_shard_key("arith", changed) == generation_shard_key("arith", BASE)


def test_shard_count_and_equivalent_spellings_do_not_change_ids():
    same = {**BASE, "shards": 5, "filters": {**BASE["filters"], "dedup": "prompt"}}
    assert synthetic_artifact_id("arith", same) == synthetic_artifact_id("arith", BASE)
    greedy_other_top_p = {**BASE, "top_p": 0.9}  # greedy ignores top_p
    assert generation_shard_key("arith", greedy_other_top_p) == generation_shard_key("arith", BASE)


def test_seed_dataset_and_teacher_enter_the_key():
    assert generation_shard_key("arith", BASE, seed=1) != generation_shard_key("arith", BASE, seed=2)
    assert generation_shard_key("a", BASE) != generation_shard_key("b", BASE)
    assert generation_shard_key("a", BASE, teacher="x") != generation_shard_key("a", BASE, teacher="y")


def test_unknown_synthetic_key_is_named():
    with pytest.raises(ValueError, match=r"synthetic\.temprature"):
        generation_shard_key("arith", {**BASE, "temprature": 1.0})


def test_ids_module_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, distill_bench.synthetic.ids as m; m.synthetic_artifact_id('a', {}); "
            "assert 'torch' not in sys.modules and 'datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
