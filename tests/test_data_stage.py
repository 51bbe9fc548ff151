"""prepare_data stage: writes a loadable dataset dir atomically, with a stable content hash and recorded counts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
from pathlib import Path

import pytest

from distill_bench.data.io import SUMMARY_FILE, content_hash, dataset_content_hash, load_dataset_dir
from distill_bench.data.stage import prepare_data
from conftest import FakeMeter

FIX = Path(__file__).parent / "fixtures" / "data"
ARITH = {"source": "embedded", "n_train": 60, "n_eval": 10, "max_length": 160,
         "task": {"min_steps": 2, "max_steps": 3, "max_operand": 30}}


def test_embedded_stage_writes_loadable_dir_with_summary(tmp_path):
    meter = FakeMeter()
    out = tmp_path / "data" / "arith"
    summary = prepare_data(meter=meter, out_dir=str(out), dataset_name="arith", spec=ARITH, seed=3)
    dsd = load_dataset_dir(out)
    assert len(dsd["train"]) == 60 and len(dsd["eval"]) == 10
    assert dsd["train"][0]["id"] == "arith-train-0"
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk["content_hash"] == summary["content_hash"] == content_hash(dsd)
    assert meter.records["n_train"] == 60 and meter.records["content_hash"] == summary["content_hash"]
    assert meter.tokens == {}  # data preparation processes no model tokens
    # no temporary siblings left behind
    assert sorted(p.name for p in out.parent.iterdir()) == ["arith"]


def test_content_hash_is_stable_across_rebuilds_and_tracks_content(tmp_path):
    a = prepare_data(meter=FakeMeter(), out_dir=str(tmp_path / "a"), dataset_name="arith", spec=ARITH, seed=3)
    b = prepare_data(meter=FakeMeter(), out_dir=str(tmp_path / "b"), dataset_name="arith", spec=ARITH, seed=3)
    c = prepare_data(meter=FakeMeter(), out_dir=str(tmp_path / "c"), dataset_name="arith", spec=ARITH, seed=4)
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]
    assert dataset_content_hash(tmp_path / "a") == a["content_hash"]
    assert dataset_content_hash(tmp_path / "a", recompute=True) == a["content_hash"]


def test_rerun_replaces_existing_output(tmp_path):
    out = tmp_path / "arith"
    prepare_data(meter=FakeMeter(), out_dir=str(out), dataset_name="arith", spec=ARITH, seed=3)
    spec = ARITH | {"n_train": 20}
    prepare_data(meter=FakeMeter(), out_dir=str(out), dataset_name="arith", spec=spec, seed=3)
    assert len(load_dataset_dir(out)["train"]) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arith"]


def test_real_source_stage_records_filter_counts(tmp_path):
    meter = FakeMeter()
    spec = {"source": "tulu3", "path": str(FIX / "tulu3.jsonl"), "split": "train", "n_train": 4, "n_eval": 2}
    summary = prepare_data(meter=meter, out_dir=str(tmp_path / "tulu"), dataset_name="tulu", spec=spec, seed=0)
    dsd = load_dataset_dir(tmp_path / "tulu")
    assert len(dsd["train"]) == summary["n_train"] == 4 and len(dsd["eval"]) == 2
    assert set(dsd["train"]["source"]) == {"tulu3"}
    assert meter.records["dropped_no_exchange"] == 1


def test_missing_dataset_path_names_key_and_leaves_no_output(tmp_path):
    spec = {"source": "openr1_math", "path": str(tmp_path / "missing" / "math.parquet"), "n_train": 4, "n_eval": 1}
    with pytest.raises(FileNotFoundError, match=r"datasets\.math\.path"):
        prepare_data(meter=FakeMeter(), out_dir=str(tmp_path / "out"), dataset_name="math", spec=spec, seed=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, key", [
    ({"source": "csv", "n_eval": 1}, r"datasets\.x\.source"),
    ({"source": "embedded", "n_eval": 1, "n_train": 2, "colour": 1}, r"datasets\.x: unknown key"),
    ({"source": "embedded", "n_eval": 1, "n_train": 2, "task": {"steps": 2}}, r"datasets\.x\.task: unknown key"),
    ({"source": "tulu3", "n_eval": 1}, r"datasets\.x\.path is required"),
])
def test_bad_spec_names_the_key(tmp_path, spec, key):
    with pytest.raises(ValueError, match=key):
        prepare_data(meter=FakeMeter(), out_dir=str(tmp_path / "o"), dataset_name="x", spec=spec, seed=0)


def test_load_dataset_dir_on_missing_dir_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset_dir(tmp_path / "nowhere")


def test_embedded_length_filter_with_tokenizer_dir(tmp_path):
    from test_data_preprocess import tiny_tokenizer

    from distill_bench.data.preprocess import chat_token_lengths

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    full = prepare_data(meter=FakeMeter(), out_dir=str(tmp_path / "full"), dataset_name="arith", spec=ARITH, seed=3)
    assert full["stats"]["length_filter"].startswith("skipped")  # no tokenizer yet in the embedded DAG
    rows = list(load_dataset_dir(tmp_path / "full")["train"])
    lengths = sorted(chat_token_lengths(tok, [r["prompt"] for r in rows], [r["response"] for r in rows]))
    cut = lengths[len(lengths) // 2]
    meter = FakeMeter()
    out = prepare_data(meter=meter, out_dir=str(tmp_path / "cut"), dataset_name="arith",
                       spec=ARITH | {"max_length": cut}, seed=3, tokenizer=str(tmp_path / "tok"))
    assert 0 < out["n_train"] < 60 and meter.records["dropped_max_length"] > 0
    with pytest.raises(ValueError, match=r"empty after the length filter datasets\.arith\.max_length=2"):
        prepare_data(meter=FakeMeter(), out_dir=str(tmp_path / "none"), dataset_name="arith",
                     spec=ARITH | {"max_length": 2}, seed=3, tokenizer=str(tmp_path / "tok"))
