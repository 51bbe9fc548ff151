"""KD trainer parts: cache validation, collator alignment, top-k folding, the cache_logits stage, a real Trainer run."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from distill_bench.kd.cache import CacheMismatchError, CacheReader, loss_positions  # noqa: E402
from distill_bench.kd.loss import KDConfigError, kd_loss  # noqa: E402
from distill_bench.kd.stage import build_cache, cache_logits  # noqa: E402
from toy_kd import TEXTS, tiny_llama, tiny_tokenizer, toy_encoded, toy_pairs  # noqa: E402
from distill_bench.kd.trainer import KDSFTTrainer, kd_trainer_parts  # noqa: E402
from distill_bench.models.tokenizer import vocab_hash  # noqa: E402
from conftest import FakeMeter  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    enc = toy_encoded(tok, 12)
    teacher = tiny_llama(len(tok), seed=2)
    d = tmp_path_factory.mktemp("kd") / "cache"
    meta = {"tokenizer_vocab_hash": vocab_hash(tok), "teacher": "toy"}
    build_cache(teacher, enc, d, k=16, value_dtype="float16", temperatures=[1.0, 2.0], batch_size=4,
                pad_token_id=tok.pad_token_id, n_shards=2, meta=meta)
    examples = [dict(e, example_index=i) for i, e in enumerate(enc)]
    return tok, enc, d, examples


def test_cache_from_another_tokenizer_is_refused(setup):
    tok, enc, d, examples = setup
    other = tiny_tokenizer(vocab_size=70, texts=TEXTS + ["another corpus entirely"])
    with pytest.raises(CacheMismatchError, match="vocab hash"):
        kd_trainer_parts(str(d), {"top_k": 16}, other, examples)


@pytest.mark.parametrize("kd, err, match", [
    ({"top_k": 32}, CacheMismatchError, "k=16"),
    ({"top_k": 16, "value_dtype": "int8"}, CacheMismatchError, "value_dtype"),
    ({"top_k": 16, "temperature": 3.0}, KDConfigError, "cache_temperatures"),
])
def test_kd_settings_the_cache_cannot_serve_are_refused(setup, kd, err, match):
    tok, _, d, examples = setup
    with pytest.raises(err, match=match):
        kd_trainer_parts(str(d), kd, tok, examples)


def test_example_not_matching_the_cached_corpus_is_refused(setup):
    tok, _, d, examples = setup
    bad = [dict(examples[0])]
    ids = list(bad[0]["input_ids"])
    ids[1] = (ids[1] + 1) % len(tok)
    bad[0]["input_ids"] = ids
    with pytest.raises(CacheMismatchError, match="differs from the example"):
        kd_trainer_parts(str(d), {"top_k": 16}, tok, bad)


def test_collator_aligns_teacher_rows_with_labels_and_truncated_example_uses_prefix(setup):
    tok, enc, d, examples = setup
    _, collator, info = kd_trainer_parts(str(d), {"top_k": 16, "temperature": 2.0}, tok, examples)
    assert info["kd_tail_mode"] == "exact"
    trunc = dict(examples[5])
    cut = int(loss_positions(trunc["completion_mask"])[2]) + 1     # keep 3 loss positions
    trunc["input_ids"], trunc["completion_mask"] = trunc["input_ids"][:cut], trunc["completion_mask"][:cut]
    feats = [examples[1], trunc, examples[7]]
    batch = collator(feats)
    mask = batch["labels"][:, 1:] != -100
    assert int(mask.sum()) == batch["kd_ids"].shape[0] == batch["kd_tail"].shape[0]
    reader = CacheReader(d)
    want = np.concatenate([reader.get(1).ids, reader.get(5).ids[:3], reader.get(7).ids])
    assert np.array_equal(batch["kd_ids"].numpy(), want)
    assert np.array_equal(batch["kd_tail"].numpy(), np.concatenate(
        [reader.get(1).tail[:, 1], reader.get(5).tail[:3, 1], reader.get(7).tail[:, 1]]))
    # labels are the completion tokens, -100 on prompt and padding
    row = batch["labels"][0]
    ex = examples[1]
    assert row[:len(ex["input_ids"])].tolist() == [t if m else -100 for t, m in zip(ex["input_ids"],
                                                                                     ex["completion_mask"])]
    assert (row[len(ex["input_ids"]):] == -100).all()


def test_smaller_top_k_folds_dropped_entries_into_the_tail(setup, tmp_path):
    tok, enc, d, examples = setup
    teacher = tiny_llama(len(tok), seed=2)
    d8 = tmp_path / "k8"
    build_cache(teacher, enc, d8, k=8, value_dtype="float16", temperatures=[1.0, 2.0], batch_size=4,
                pad_token_id=tok.pad_token_id, meta={"tokenizer_vocab_hash": vocab_hash(tok)})
    for tau in (1.0, 2.0):
        _, c16, _ = kd_trainer_parts(str(d), {"top_k": 8, "temperature": tau}, tok, examples)
        _, c8, _ = kd_trainer_parts(str(d8), {"top_k": 8, "temperature": tau}, tok, examples)
        b16, b8 = c16(examples[:4]), c8(examples[:4])
        assert torch.equal(b16["kd_ids"], b8["kd_ids"])
        student = torch.randn(*b16["input_ids"].shape, len(tok), generator=torch.Generator().manual_seed(0))
        l16 = kd_loss(student, b16["labels"], b16["kd_ids"], b16["kd_values"], b16["kd_tail"], alpha=0.5,
                      temperature=tau)[0]
        l8 = kd_loss(student, b8["labels"], b8["kd_ids"], b8["kd_values"], b8["kd_tail"], alpha=0.5,
                     temperature=tau)[0]
        assert l16.item() == pytest.approx(l8.item(), rel=1e-3)       # fp16-rounded values fold into the tail


def test_cache_logits_stage_writes_manifest_and_meters_tokens(tmp_path):
    import datasets

    from distill_bench.data.io import save_dataset_dir
    from distill_bench.models.tokenizer import save_tokenizer

    tok = tiny_tokenizer()
    pairs = toy_pairs(9, seed=3)
    rows = {"id": [f"toy-train-{i}" for i in range(9)], "prompt": [p for p, _ in pairs],
            "response": [r for _, r in pairs], "answer": [None] * 9, "source": ["embedded"] * 9}
    ev = {k: v[:2] for k, v in rows.items()}
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "eval": datasets.Dataset.from_dict(ev)})
    save_dataset_dir(dsd, tmp_path / "data", {"n_train": 9})
    save_tokenizer(tok, tmp_path / "tok")
    tiny_llama(len(tok), seed=4).save_pretrained(tmp_path / "teacher")
    meter = FakeMeter()
    cache_logits(meter=meter, teacher=str(tmp_path / "teacher"), tokenizer=str(tmp_path / "tok"),
                 dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "cache"),
                 kd={"top_k": 8, "value_dtype": "int8", "temperature": 2.0, "batch_size": 4},
                 training={"max_length": 128}, seed=0)
    m = CacheReader(tmp_path / "cache").manifest
    enc = toy_encoded(tok, 9, seed=3)
    assert meter.primary == "input_tokens"
    assert meter.tokens["input_tokens"] == sum(len(e["input_ids"]) for e in enc) == m["input_tokens"]
    assert meter.tokens["cached_positions"] == m["n_positions"]
    assert m["temperatures"] == [1.0, 2.0] and m["value_dtype"] == "int8" and m["max_length"] == 128
    assert meter.records["bytes_per_position"] == 8 * 3 + 4 + 8 and meter.records["bytes_per_entry"] == 3

    # the workflow's way to a temperature the cache lacks: the cache_tail stage, read as one more tail column
    from distill_bench.kd.stage import cache_tail

    tail_meter = FakeMeter()
    cache_tail(meter=tail_meter, teacher=str(tmp_path / "teacher"), tokenizer=str(tmp_path / "tok"),
               dataset=str(tmp_path / "data"), kd_cache=str(tmp_path / "cache"), out_dir=str(tmp_path / "tau3"),
               kd={"temperature": 3.0, "batch_size": 4}, training={"max_length": 128}, seed=0)
    assert tail_meter.tokens["tail_positions"] == m["n_positions"]
    assert tail_meter.tokens["input_tokens"] == m["input_tokens"]
    joined = CacheReader(tmp_path / "cache", tail_dirs=[tmp_path / "tau3"])
    assert joined.temperatures == [1.0, 2.0, 3.0]
    _, collator, info = kd_trainer_parts(str(tmp_path / "cache"), {"top_k": 8, "value_dtype": "int8",
                                                                  "temperature": 3.0}, tok,
                                         [dict(e, example_index=i) for i, e in enumerate(enc)],
                                         tail_dirs=[str(tmp_path / "tau3")])
    assert info["kd_tail_mode"] == "exact" and info["kd_tail_artifacts"] == [str(tmp_path / "tau3")]


def test_kd_trainer_trains_with_grad_accumulation_and_reports_data_wait(setup, tmp_path):
    import datasets
    from trl import SFTConfig

    tok, enc, d, examples = setup
    trainer_cls, collator, _ = kd_trainer_parts(str(d), {"top_k": 16, "temperature": 2.0, "alpha": 0.5}, tok,
                                                examples)
    assert issubclass(trainer_cls, KDSFTTrainer) and trainer_cls.kd_temperature == 2.0
    ds = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "completion_mask": e["completion_mask"],
                                      "example_index": e["example_index"]} for e in examples])
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                     max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                     dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, dataloader_num_workers=0)
    trainer = trainer_cls(model=tiny_llama(len(tok), seed=3), args=args, train_dataset=ds, processing_class=tok,
                          data_collator=collator)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append((num_items_in_batch, int((inputs["labels"][:, 1:] != -100).sum())))
        return original(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    # each optimizer step normalises by the loss tokens of both accumulated micro-batches
    assert len(seen) == 4 and all(n is not None for n, _ in seen)
    assert int(seen[0][0]) == seen[0][1] + seen[1][1] and int(seen[2][0]) == seen[2][1] + seen[3][1]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(np.isfinite(h["loss"]) and "kd_kl" in h and "kd_ce" in h for h in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    frac = trainer.data_wait_fraction()
    assert frac is not None and 0.0 <= frac < 1.0


def kd_parts_and_dataset(setup):
    """(tokenizer, trainer class, collator, train dataset) for tau 2, alpha 0.3 on the module's cache."""
    import datasets

    tok, enc, d, examples = setup
    trainer_cls, collator, _ = kd_trainer_parts(str(d), {"top_k": 16, "temperature": 2.0, "alpha": 0.3}, tok,
                                                examples)
    ds = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "completion_mask": e["completion_mask"],
                                      "example_index": e["example_index"]} for e in examples])
    return tok, trainer_cls, collator, ds


def kd_trainer_on(trainer_cls, model, tok, ds, collator, out: Path, **attrs):
    """A trainer of ``trainer_cls`` (with ``attrs`` set on a subclass) over ``model`` on the CPU, batch 5."""
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=5, report_to=[],
                     dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, save_strategy="no")
    return type("T", (trainer_cls,), attrs)(model=model, args=args, train_dataset=ds, processing_class=tok,
                                            data_collator=collator)


def loss_and_grads(trainer, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training-mode KD loss on ``batch`` and the gradients it gives every parameter."""
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def assert_same_loss_and_grads(a, b) -> None:
    (l1, g1), (l2, g2) = a, b
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(g1, g2))
    assert any(x.abs().sum() > 0 for x in g1)


def test_head_on_loss_positions_gives_the_full_logits_loss_and_gradients(setup, tmp_path):
    """kd_head_on_loss_positions (LM head on loss rows only) must be the same function as the [B, L, V] path."""
    tok, trainer_cls, collator, ds = kd_parts_and_dataset(setup)
    batch = collator([ds[i] for i in range(5)])
    results = []
    for head_only in (True, False):
        trainer = kd_trainer_on(trainer_cls, tiny_llama(len(tok), seed=3), tok, ds, collator,
                                tmp_path / f"o{head_only}", kd_head_on_loss_positions=head_only)
        assert trainer._kd_head is head_only
        results.append(loss_and_grads(trainer, batch))
    assert_same_loss_and_grads(*results)


def test_padding_free_kd_batch_gives_the_padded_loss_and_gradients(setup, tmp_path):
    """The collator's flattened layout (train_student sets it on a GPU) must give the padded batch's KD loss."""
    tok, trainer_cls, collator, ds = kd_parts_and_dataset(setup)
    results = []
    for padding_free, multiple in ((False, None), (True, None), (True, 16)):
        collator.padding_free, collator.pad_to_multiple_of = padding_free, multiple
        batch = collator([ds[i] for i in range(5)])
        assert ("position_ids" in batch) is padding_free and ("attention_mask" in batch) is not padding_free
        real = sum(len(ds[i]["input_ids"]) for i in range(5))
        assert batch["num_real_tokens"] == real and batch["input_ids"].numel() >= real
        if multiple:
            assert batch["input_ids"].shape[1] % multiple == 0
        trainer = kd_trainer_on(trainer_cls, tiny_llama(len(tok), seed=3), tok, ds, collator,
                                tmp_path / f"o{padding_free}{multiple}")
        results.append(loss_and_grads(trainer, batch))
    for other in results[1:]:
        assert_same_loss_and_grads(results[0], other)


def test_kd_loss_terms_compile_with_the_layers_and_give_the_eager_loss_and_gradients(setup, tmp_path):
    """The KD trainer compiles its loss's per-chunk terms exactly when the decoder layers are compiled (the GPU
    default), and the compiled terms are the eager loss and gradients (inductor's own kernels, rounded alike in fp32)."""
    from distill_bench.train.speed import compile_decoder_layers

    tok, trainer_cls, collator, ds = kd_parts_and_dataset(setup)
    batch = collator([ds[i] for i in range(5)])
    assert kd_trainer_on(trainer_cls, tiny_llama(len(tok), seed=3), tok, ds, collator,
                         tmp_path).kd_loss_compiled is False
    layered = tiny_llama(len(tok), seed=3)
    compile_decoder_layers(layered)   # nothing compiles before a forward; the trainer only reads the marks
    assert kd_trainer_on(trainer_cls, layered, tok, ds, collator, tmp_path).kd_loss_compiled is True
    assert kd_trainer_on(trainer_cls, layered, tok, ds, collator, tmp_path,
                         kd_compile_loss=False).kd_loss_compiled is False
    results = [loss_and_grads(kd_trainer_on(trainer_cls, tiny_llama(len(tok), seed=3), tok, ds, collator,
                                            tmp_path / f"c{compiled}", kd_compile_loss=compiled), batch)
               for compiled in (False, True)]
    assert_same_loss_and_grads(*results)


def test_kd_stage_record_holds_the_data_wait_share_and_the_optimizer_that_ran(setup, tmp_path):
    """What train_student reports to the stage JSON for a KD student: the share of training time spent waiting for
    the collator's cache reads, and the optimizer by the name HF gave it (optim auto on a CPU)."""
    from distill_bench.train.trainer import TrainSettings, train_student

    tok, enc, d, examples = setup
    trainer_cls, collator, _ = kd_trainer_parts(str(d), {"top_k": 16, "temperature": 2.0, "alpha": 0.5}, tok,
                                                examples)
    budget = sum(sum(e["completion_mask"]) for e in examples)
    meter = FakeMeter()
    train_student(model=tiny_llama(len(tok), seed=3), tokenizer=tok, examples=examples, seed=0,
                  output_dir=tmp_path / "kd", trainer_cls=trainer_cls, collator=collator, meter=meter,
                  settings=TrainSettings.from_dict({"token_budget": budget, "max_length": 64, "batch_size": 3,
                                                    "precision": "fp32"}))
    wait = meter.metrics["data_wait_fraction"]
    assert isinstance(wait, float) and 0.0 < wait < 1.0
    assert meter.metrics["optim"] == "adamw_torch_fused"
    assert meter.metrics["kd_loss_compiled"] is False
