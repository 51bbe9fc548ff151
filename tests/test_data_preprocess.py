"""Real-dataset preprocessors on small hand-written fixtures in each source's schema (no download)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
from pathlib import Path

import datasets
import pytest

from distill_bench.data.preprocess import DataSourceError, OfflineSourceError, chat_token_lengths, preprocess

FIX = Path(__file__).parent / "fixtures" / "data"
COLUMNS = ["id", "prompt", "response", "answer", "source"]


def tiny_tokenizer():
    """A 300-entry byte-level BPE with a chat template, built in-process (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [line for f in FIX.glob("*.jsonl") for line in f.read_text().splitlines()]
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    return fast


def run(family, path=None, **kw):
    args = dict(family=family, path=str(path or FIX / f"{family}.jsonl"), dataset_name="d", seed=0, n_eval=2)
    return preprocess(**(args | kw))


def _rows(dsd):
    return {s: [dict(r) for r in dsd[s]] for s in dsd}


def test_tulu3_first_exchange_and_drops_counted():
    dsd, stats = run("tulu3")
    assert dsd["train"].column_names == COLUMNS
    # 9 rows: 1 without an assistant reply, 1 duplicate prompt (case/space-insensitive) -> 7 kept
    assert stats["rows_read"] == 9 and stats["kept"] == 7
    assert stats["dropped"]["no_exchange"] == 1 and stats["dropped"]["duplicate_prompt"] == 1
    assert stats["multi_turn_truncated"] == 1
    assert len(dsd["eval"]) == 2 and len(dsd["train"]) == 5
    rows = {r["id"]: r for s in ("train", "eval") for r in dsd[s]}
    assert set(rows) <= {"oasst1_1", "dup_7", "flan_2", "sys_3", "multi_4", "math_6", "code_8", "poem_9"}
    if "sys_3" in rows:  # system turn is not part of the prompt
        assert rows["sys_3"]["prompt"] == "Name three primary colors."
    if "multi_4" in rows:  # only the first exchange survives
        assert rows["multi_4"]["response"] == "Joyful."
    assert all(r["answer"] is None and r["source"] == "tulu3" for r in rows.values())


def test_openr1_math_columns_and_fallbacks():
    dsd, stats = run("openr1_math", n_eval=1)
    rows = {r["id"]: r for s in ("train", "eval") for r in dsd[s]}
    assert stats["dropped"]["empty_text"] == 1 and len(rows) == 6
    assert rows["u-001"]["prompt"] == "Compute $3 + 4 \\cdot 2$."
    assert rows["u-001"]["answer"] == "11"
    assert rows["u-001"]["response"].startswith("Multiplication first")
    assert rows["u-004"]["response"].startswith("Since $7^2 = 49$")  # empty solution -> first generation
    assert all(r["source"] == "openr1_math" for r in rows.values())


def test_codeforces_cots_drops_unfinished_and_uses_messages_fallback():
    dsd, stats = run("codeforces_cots", n_eval=1)
    rows = [r for s in ("train", "eval") for r in dsd[s]]
    assert stats["dropped"]["unfinished"] == 1
    assert stats["dropped"]["duplicate_prompt"] == 1  # two generations for problem 1000/A
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    by_id = {r["id"]: r for r in rows}
    assert by_id["1002/B"]["prompt"].startswith("Print the number 42.")
    assert "print(42)" in by_id["1002/B"]["response"]
    assert all(r["answer"] is None for r in rows)


def test_subsampling_is_deterministic_by_seed_and_splits_disjoint():
    a, _ = run("tulu3", seed=1, n_eval=3, n_train=3)
    b, _ = run("tulu3", seed=1, n_eval=3, n_train=3)
    assert _rows(a) == _rows(b)
    assert not set(a["train"]["prompt"]) & set(a["eval"]["prompt"])
    picks = {tuple(run("tulu3", seed=s, n_eval=3, n_train=3)[0]["eval"]["id"]) for s in range(6)}
    assert len(picks) > 1  # the seed changes which rows are drawn
    assert len(a["train"]) == 3 and len(a["eval"]) == 3


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk", "folder"])
def test_local_formats_load_the_same_records(tmp_path, fmt):
    rows = [json.loads(line) for line in (FIX / "openr1_math.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        path = tmp_path / "openr1.parquet"
        ds.to_parquet(str(path))
    elif fmt == "save_to_disk":
        path = tmp_path / "arrow"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    else:
        path = tmp_path / "folder"
        path.mkdir()
        ds.to_parquet(str(path / "train-00000.parquet"))
    got, _ = run("openr1_math", path=path, n_eval=1)
    ref, _ = run("openr1_math", n_eval=1)
    assert _rows(got) == _rows(ref)


def test_missing_column_names_column_and_source(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "x", "conversation": []}) + "\n")
    with pytest.raises(DataSourceError, match=r"no column 'messages'.*tulu3") as err:
        run("tulu3", path=path)
    assert str(path) in str(err.value)


def test_missing_local_path_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"datasets\.d\.path") as err:
        run("tulu3", path=tmp_path / "nope.parquet")
    assert "nope.parquet" in str(err.value)


def test_hub_id_offline_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OfflineSourceError, match=r"offline.*datasets\.d\.path"):
        run("tulu3", path="no-such-owner/no-such-dataset-xyz")


def test_offline_requested_after_import_fails_without_touching_the_hub(monkeypatch):
    from datasets import config as ds_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", False)  # library itself still thinks it is online
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not reach the hub"))
    with pytest.raises(OfflineSourceError, match=r"not a local path"):
        run("tulu3", path="allenai/tulu-3-sft-mixture")


def test_length_filter_counts_exact_chat_tokens():
    tok = tiny_tokenizer()
    base, _ = run("tulu3", n_eval=1)
    rows = list(base["train"]) + list(base["eval"])
    lengths = chat_token_lengths(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])
    cut = sorted(lengths)[len(lengths) // 2]
    dsd, stats = run("tulu3", n_eval=1, tokenizer=tok, max_length=cut)
    kept = list(dsd["train"]) + list(dsd["eval"])
    assert stats["dropped"]["max_length"] >= sum(n > cut for n in lengths)
    got = chat_token_lengths(tok, [r["prompt"] for r in kept], [r["response"] for r in kept])
    assert max(got) <= cut
    # the count equals the length of the tokenised chat template, as training sees it
    one = kept[0]
    ids = tok.apply_chat_template([{"role": "user", "content": one["prompt"]},
                                   {"role": "assistant", "content": one["response"]}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert chat_token_lengths(tok, [one["prompt"]], [one["response"]]) == [len(ids)]


def test_empty_after_length_filter_names_dataset_and_filter():
    with pytest.raises(DataSourceError, match=r"'d'.*empty after filtering.*datasets\.d\.max_length=3"):
        run("tulu3", tokenizer=tiny_tokenizer(), max_length=3)


def test_empty_after_mapping_names_the_mapping_filter(tmp_path):
    path = tmp_path / "noreply.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": "hi"}]}) + "\n"
                            for i in range(3)))
    with pytest.raises(DataSourceError, match=r"empty after filtering.*no_exchange"):
        run("tulu3", path=path)


def test_eval_taking_everything_is_an_error():
    with pytest.raises(DataSourceError, match=r"n_eval=7; nothing left for train"):
        run("tulu3", n_eval=7)


GSM8K = FIX / "gsm8k"


def test_gsm8k_main_layout_maps_question_answer_and_final_line():
    dsd, stats = run("gsm8k", path=GSM8K / "train.jsonl", n_eval=2)
    rows = {r["prompt"][:20]: r for s in ("train", "eval") for r in dsd[s]}
    assert stats["dropped"]["no_final_answer"] == 1 and len(rows) == 6
    natalia = rows["Natalia sold clips t"]
    assert natalia["answer"] == "72"
    assert natalia["response"].endswith("#### 72") and "<<48/2=24>>" in natalia["response"]
    assert all(r["source"] == "gsm8k" and r["id"].startswith("d-train-") for r in rows.values())


def test_gsm8k_eval_split_comes_from_test_and_train_never_contains_an_eval_prompt():
    dsd, stats = run("gsm8k", path=GSM8K, n_eval=4, eval_split="test")
    train = [dict(r) for r in dsd["train"]]
    evals = [dict(r) for r in dsd["eval"]]
    assert {r["id"].split("-")[1] for r in evals} == {"test"} and len(evals) == 4
    assert {r["answer"] for r in evals} == {"18", "3", "70000", "10"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert stats["dropped"]["eval_overlap"] == 1 and stats["eval_split"] == "test"
    assert len(train) == 5  # 7 rows - one without '#### ' - one also in test


def test_gsm8k_eval_split_from_a_single_file_is_refused():
    with pytest.raises(DataSourceError, match=r"eval_split='test'.*one file"):
        run("gsm8k", path=GSM8K / "train.jsonl", n_eval=1, eval_split="test")


def test_gsm8k_answers_score_with_the_lm_eval_extractors():
    from distill_bench.eval.scoring import exact_match, extract_flexible, extract_strict

    dsd, _ = run("gsm8k", path=GSM8K, n_eval=4, eval_split="test")
    for row in dsd["eval"]:
        # the reference solution itself scores under both of lm-eval's gsm8k filters, against either gold form
        assert exact_match(extract_strict(row["response"]), row["answer"])
        assert exact_match(extract_flexible(row["response"]), row["response"])
