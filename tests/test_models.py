"""Tokenizer, chat template, vocabulary hash, model init/loading and the models stages (tiny, offline)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from distill_bench.models.build import (count_parameters, init_model_from_arch, load_model,  # noqa: E402
                                        resolve_model_ref)
from distill_bench.models.tokenizer import (EOS, TokenizerMismatchError, assert_same_tokenizer,  # noqa: E402
                                            encode_prompt, encode_prompt_response, load_tokenizer,
                                            train_tokenizer, vocab_hash)
from conftest import (TINY_ARCH, FakeMeter, arith_pairs, save_pairs_dataset, save_tiny_model,  # noqa: E402
                      train_arith_tokenizer)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_arith_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", 200, 120)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def other_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok2") / "other"
    train_tokenizer(["completely different words here and there"] * 20, 60, d)
    return d


def test_tokenizer_round_trips_text_and_splits_digits(tok):
    text = "Tom has  12 apples.\nHe buys 345 more.\n#### 357"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    digit_pieces = [p.strip("\u2581") for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p) == 1 for p in digit_pieces), pieces
    assert "".join(digit_pieces) == "12345357"


def test_chat_template_adds_generation_prompt_and_eos_closes_the_assistant_turn(tok):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith(tok.bos_token) and text.endswith("<|assistant|>")
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "5"}], tokenize=False)
    assert full.endswith("5" + EOS)
    assert tok.eos_token == EOS and tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)


def test_prompt_ids_are_a_prefix_and_mask_covers_exactly_the_response_and_eos(tok):
    prompt, response = arith_pairs(1, seed=5)[0]
    enc = encode_prompt_response(tok, prompt, response, max_length=200)
    p_ids = encode_prompt(tok, prompt)
    assert enc["input_ids"][:len(p_ids)] == p_ids
    assert enc["completion_mask"] == [0] * len(p_ids) + [1] * (len(enc["input_ids"]) - len(p_ids))
    completion = [t for t, m in zip(enc["input_ids"], enc["completion_mask"]) if m]
    assert completion[-1] == tok.eos_token_id
    assert tok.decode(completion[:-1]) == response


def test_encode_returns_none_when_over_max_length(tok):
    prompt, response = arith_pairs(1)[0]
    n = len(encode_prompt_response(tok, prompt, response, None)["input_ids"])
    assert encode_prompt_response(tok, prompt, response, n) is not None
    assert encode_prompt_response(tok, prompt, response, n - 1) is None


def test_saved_tokenizer_reloads_with_same_hash_and_template(tok_dir, tok):
    again = load_tokenizer(tok_dir)
    assert vocab_hash(again) == vocab_hash(tok)
    assert again.chat_template and "generation" in again.chat_template


def test_tokenizer_mismatch_refused_naming_both_sides(tok_dir, other_tok_dir):
    a, b = load_tokenizer(tok_dir), load_tokenizer(other_tok_dir)
    assert vocab_hash(a) != vocab_hash(b)
    with pytest.raises(TokenizerMismatchError) as err:
        assert_same_tokenizer(a, b, "teacher", names=("teacher-tok", "run-tok"))
    msg = str(err.value)
    assert "teacher-tok" in msg and "run-tok" in msg and "teacher" in msg
    assert assert_same_tokenizer(a, load_tokenizer(tok_dir), "x") == vocab_hash(a)


def test_init_model_uses_tokenizer_vocab_ties_embeddings_and_is_seeded(tok):
    m1 = init_model_from_arch(TINY_ARCH, tok, seed=3)
    m2 = init_model_from_arch(TINY_ARCH, tok, seed=3)
    m3 = init_model_from_arch(TINY_ARCH, tok, seed=4)
    assert m1.config.vocab_size == len(tok)
    assert m1.get_input_embeddings().weight is m1.get_output_embeddings().weight
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all((sd1[k] == sd2[k]).all() for k in sd1)
    assert any((sd1[k] != sd3[k]).any() for k in sd1)
    assert count_parameters(m1) < sum(p.numel() for p in m1.state_dict().values())  # tied counted once
    with pytest.raises(ValueError, match="num_layerz"):
        init_model_from_arch({**TINY_ARCH, "num_layerz": 2}, tok, seed=0)


def test_missing_model_path_gives_clear_error(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(FileNotFoundError, match="such-model"):
        load_model(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json nor model_ref.json"):
        resolve_model_ref(empty)


def test_model_ref_pointer_resolves_and_loads(tmp_path, tok):
    from distill_bench.models.build import write_model_ref

    real = save_tiny_model(tok, tmp_path / "real")
    write_model_ref(tmp_path / "ptr", str(real))
    assert resolve_model_ref(tmp_path / "ptr") == str(real)
    assert count_parameters(load_model(tmp_path / "ptr")) == count_parameters(load_model(real))


def test_prepare_teacher_pretrained_writes_model_ref_after_tokenizer_check(tmp_path, tok_dir, other_tok_dir, tok):
    from distill_bench.models.stage import prepare_teacher

    teacher_dir = save_tiny_model(tok, tmp_path / "hub-teacher")
    meter = FakeMeter()
    prepare_teacher(meter=meter, out_dir=str(tmp_path / "teacher"), tokenizer=str(tok_dir),
                    teacher={"source": "pretrained", "name_or_path": str(teacher_dir)}, dataset="unused",
                    training={}, seed=0)
    ref = json.loads((tmp_path / "teacher" / "model_ref.json").read_text())
    assert ref["name_or_path"] == str(teacher_dir) and ref["vocab_hash"] == vocab_hash(tok)
    assert meter.metrics["vocab_hash"] == vocab_hash(tok)
    assert not (tmp_path / "teacher" / "model.safetensors").exists()  # a pointer, never a copy

    with pytest.raises(TokenizerMismatchError, match="other"):
        prepare_teacher(meter=FakeMeter(), out_dir=str(tmp_path / "teacher2"), tokenizer=str(other_tok_dir),
                        teacher={"source": "pretrained", "name_or_path": str(teacher_dir)}, dataset="unused",
                        training={}, seed=0)
    assert not (tmp_path / "teacher2").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_teacher(meter=FakeMeter(), out_dir=str(tmp_path / "t3"), tokenizer=str(tok_dir),
                        teacher={"source": "pretrained", "name_or_path": str(tmp_path / "nowhere")},
                        dataset="unused", training={}, seed=0)


def test_prepare_tokenizer_trains_on_dataset_dirs_and_init_student_saves_model(tmp_path):
    from distill_bench.models.stage import init_student, prepare_tokenizer

    ds = save_pairs_dataset(tmp_path / "data", arith_pairs(50))
    meter = FakeMeter()
    prepare_tokenizer(meter=meter, out_dir=str(tmp_path / "tok"), source="train", vocab_size=100,
                      datasets=[str(ds)], seed=1)
    t = load_tokenizer(tmp_path / "tok")
    assert meter.metrics["vocab_hash"] == vocab_hash(t) and len(t) <= 100
    m = FakeMeter()
    init_student(meter=m, out_dir=str(tmp_path / "init"), tokenizer=str(tmp_path / "tok"),
                 student={"init": "scratch", "arch": TINY_ARCH}, seed=1)
    model = load_model(tmp_path / "init")
    assert m.metrics["parameters"] == count_parameters(model)
    assert vocab_hash(load_tokenizer(tmp_path / "init")) == vocab_hash(t)
    with pytest.raises(FileNotFoundError, match="missing-data"):
        prepare_tokenizer(meter=FakeMeter(), out_dir=str(tmp_path / "tok2"), source="train", vocab_size=100,
                          datasets=[str(tmp_path / "missing-data")], seed=1)


def test_prepare_teacher_train_writes_trained_hf_model_dir(tmp_path, tok_dir, tok):
    from distill_bench.models.stage import prepare_teacher

    data = save_pairs_dataset(tmp_path / "data", arith_pairs(20))
    meter = FakeMeter()
    training = {"token_budget": 999, "max_length": 64, "batch_size": 8, "lr": 1e-3, "save_steps": 100,
                "precision": "fp32"}
    prepare_teacher(meter=meter, out_dir=str(tmp_path / "teacher"), tokenizer=str(tok_dir),
                    teacher={"source": "train", "arch": TINY_ARCH, "train": {"tokens": 150, "lr": 5e-3,
                                                                             "batch_size": 4}},
                    dataset=str(data), training=training, seed=0)
    assert meter.tokens["trained_tokens"] == 150  # teacher.train.tokens, not training.token_budget
    assert meter.metrics["parameters"] == count_parameters(load_model(tmp_path / "teacher"))
    assert (tmp_path / "teacher" / "train_log.json").is_file()
    assert vocab_hash(load_tokenizer(tmp_path / "teacher")) == vocab_hash(tok)
    assert not any(p.name.startswith(".teacher") for p in tmp_path.iterdir())  # work dir cleaned up
