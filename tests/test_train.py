"""Exact token budget, LR schedule, token accounting, resume/refusal and the train_student stage (tiny, offline)."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from distill_bench.models.tokenizer import (TokenizerMismatchError, encode_prompt_response,  # noqa: E402
                                            load_tokenizer, train_tokenizer)
from distill_bench.train.budget import build_budgeted_dataset, trained_positions  # noqa: E402
from distill_bench.train.trainer import (CheckpointMismatchError, TrainingInterrupted, TrainSettings,  # noqa: E402
                                         train_student)
from conftest import TINY_ARCH, FakeMeter, arith_pairs, save_pairs_dataset, train_arith_tokenizer  # noqa: E402


def toy_examples(n=7):
    exs = []
    for i in range(n):
        plen, clen = 2 + i % 3, 1 + (i * 5) % 4
        exs.append({"input_ids": list(range(100 + i, 100 + i + plen + clen)),
                    "completion_mask": [0] * plen + [1] * clen, "example_index": 10 * i})
    return exs


@pytest.mark.parametrize("budget", [1, 3, 5, 16, 17, 40, 123])
def test_budget_is_exact_with_truncated_last_example(budget):
    exs = toy_examples()
    stream, info = build_budgeted_dataset(exs, budget, seed=3)
    assert sum(trained_positions(e["completion_mask"]) for e in stream) == budget
    last = stream[-1]
    assert last["completion_mask"][-1] == 1  # ends exactly on a counted token
    src = exs[last["source_index"]]
    assert last["input_ids"] == src["input_ids"][:len(last["input_ids"])]
    assert all(e["example_index"] == 10 * e["source_index"] for e in stream)  # extra fields carried
    total = sum(sum(e["completion_mask"]) for e in exs)  # 17
    assert info["epochs_started"] == math.ceil(budget / total)


def test_budget_larger_than_data_repeats_epochs_with_new_shuffle_and_is_deterministic():
    exs = toy_examples()
    s1, _ = build_budgeted_dataset(exs, 17 * 3, seed=1)
    s2, _ = build_budgeted_dataset(exs, 17 * 3, seed=1)
    s3, _ = build_budgeted_dataset(exs, 17 * 3, seed=2)
    assert s1 == s2 and s1 != s3
    orders = [[e["source_index"] for e in s1 if e["epoch"] == k] for k in range(3)]
    assert all(sorted(o) == list(range(len(exs))) for o in orders)  # every example once per epoch
    assert len({tuple(o) for o in orders}) > 1


def test_budget_rejects_completion_at_position_zero_and_bad_budget():
    with pytest.raises(ValueError, match="position 0"):
        build_budgeted_dataset([{"input_ids": [1, 2], "completion_mask": [1, 1]}], 1, 0)
    with pytest.raises(ValueError, match="token_budget"):
        build_budgeted_dataset(toy_examples(), 0, 0)


def test_settings_reject_unknown_key_and_bad_precision():
    with pytest.raises(ValueError, match="tokn_budget"):
        TrainSettings.from_dict({"tokn_budget": 5, "token_budget": 5, "max_length": 10})
    with pytest.raises(ValueError, match="precision"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 10, "precision": "fp8"})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_arith_tokenizer(tmp_path_factory.mktemp("trtok") / "tok", 100, 100))


@pytest.fixture(scope="module")
def examples(tok):
    out = []
    for i, (p, r) in enumerate(arith_pairs(40)):
        e = encode_prompt_response(tok, p, r, 64)
        e["example_index"] = i
        out.append(e)
    return out


def settings(**kw):
    base = dict(token_budget=300, max_length=64, batch_size=4, grad_accum=1, lr=5e-3, warmup_ratio=0.1,
                lr_scheduler="cosine", precision="fp32", save_steps=1000, logging_steps=1, stale_checkpoints="refuse")
    base.update(kw)
    return TrainSettings.from_dict(base)


def model(tok, seed=0):
    from distill_bench.models.build import init_model_from_arch

    return init_model_from_arch(TINY_ARCH, tok, seed)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def test_tiny_run_trains_exactly_the_budget_and_lr_decays_to_zero(tok, examples, tmp_path):
    meter = FakeMeter()
    s = settings(batch_size=2)
    res = train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                        output_dir=tmp_path / "run", meter=meter)
    stream, _ = build_budgeted_dataset(examples, s.token_budget, 0)
    assert res["max_steps"] == res["steps"] == math.ceil(len(stream) / s.batch_size)
    assert meter.tokens["trained_tokens"] == res["trained_tokens"] == 300 and meter.primary == "trained_tokens"
    assert meter.metrics["trained_tokens_total"] == 300 and meter.metrics["training_completed"] is True
    # the stage record names the optimizer that ran: optim auto on a CPU is HF's default, by HF's name
    assert meter.metrics["optim"] == res["optim"] == "adamw_torch_fused"
    assert meter.tokens["input_tokens"] == sum(len(e["input_ids"]) for e in stream)
    lrs = [lr for _, lr in res["lr_curve"]]
    assert max(lrs) == pytest.approx(s.lr, rel=0.05)
    n, w = res["steps"], math.ceil(0.1 * res["steps"])  # cosine over the real optimizer steps
    assert res["lr_last_step"] == pytest.approx(s.lr * 0.5 * (1 + math.cos(math.pi * (n - 1 - w) / (n - w))))
    assert res["lr_last_step"] < 0.05 * s.lr and res["lr_end"] < 1e-9
    assert res["loss_curve"][-1][0] == res["steps"] and res["final_loss"] < res["loss_curve"][0][1]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "train_log.json").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_grad_accumulation_matches_one_big_batch(tok, examples, tmp_path):
    import torch

    a = tmp_path / "a"
    b = tmp_path / "b"
    train_student(model=model(tok), tokenizer=tok, examples=examples, settings=settings(batch_size=8), seed=0,
                  output_dir=a)
    train_student(model=model(tok), tokenizer=tok, examples=examples,
                  settings=settings(batch_size=4, grad_accum=2), seed=0, output_dir=b)
    wa, wb = weights(a), weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


class _KillAt:
    """A TrainerCallback that sends this process SIGTERM once, at a given optimizer step."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    os.kill(os.getpid(), signal.SIGTERM)

        return Kill()


def test_sigterm_checkpoints_then_resume_matches_uninterrupted_run_and_other_config_refused(tok, examples,
                                                                                            tmp_path):
    import torch

    s = settings(save_steps=1000)
    ref = train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                        output_dir=tmp_path / "ref")

    seen, first = [], FakeMeter()
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # stands in for the meter
    try:
        with pytest.raises(TrainingInterrupted):
            train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                          output_dir=tmp_path / "run", trainer_kwargs={"callbacks": [_KillAt(4)]}, meter=first)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen == [signal.SIGTERM]  # the previous handler got the signal after the checkpoint
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "run" / "final").exists()

    with pytest.raises(CheckpointMismatchError, match="settings"):
        train_student(model=model(tok), tokenizer=tok, examples=examples, settings=settings(lr=1e-3), seed=0,
                      output_dir=tmp_path / "run")
    with pytest.raises(CheckpointMismatchError, match="seed"):
        train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=1,
                      output_dir=tmp_path / "run")

    meter = FakeMeter()
    res = train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                        output_dir=tmp_path / "run", meter=meter)
    assert res["resumed_from_step"] == 4 and res["steps"] == ref["steps"]
    # the meter sums attempts: each attempt bills only what it trained, together exactly the budget
    assert res["trained_tokens"] == 300 and 0 < res["trained_tokens_this_attempt"] < 300
    assert first.tokens["trained_tokens"] + meter.tokens["trained_tokens"] == 300
    assert meter.tokens["trained_tokens"] == res["trained_tokens_this_attempt"]
    assert first.tokens["input_tokens"] + meter.tokens["input_tokens"] == ref["input_tokens"]
    wr, wf = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.allclose(wr[k], wf[k], atol=1e-5) for k in wr)
    assert res["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-5)


def test_resume_with_the_compiled_clip_optimizer_matches_its_uninterrupted_run(tok, examples, tmp_path):
    """adamw_compiled_clip's moments, step counts and learning rate come back from an HF checkpoint exactly."""
    import torch

    s = settings(save_steps=1000, optim="adamw_compiled_clip", max_grad_norm=0.05)   # every step clipped
    ref = train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                        output_dir=tmp_path / "ref")
    old = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with pytest.raises(TrainingInterrupted):
            train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                          output_dir=tmp_path / "run", trainer_kwargs={"callbacks": [_KillAt(4)]})
    finally:
        signal.signal(signal.SIGTERM, old)
    res = train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                        output_dir=tmp_path / "run")
    assert res["resumed_from_step"] == 4 and res["steps"] == ref["steps"] and res["optim"] == "adamw_compiled_clip"
    wr, wf = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.allclose(wr[k], wf[k], atol=1e-5) for k in wr)
    assert res["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-5)


def test_train_stage_refuses_tokenizer_mismatch_then_trains_sft_gt(tmp_path, tok):
    from distill_bench.models.build import save_model_dir
    from distill_bench.train.stage import train_student as stage

    data = save_pairs_dataset(tmp_path / "data", arith_pairs(30))
    tok.save_pretrained(str(tmp_path / "tok"))
    other = tmp_path / "other_tok"
    train_tokenizer(["unrelated vocabulary words only"] * 10, 60, other)
    save_model_dir(model(tok), tmp_path / "init", tok)
    training = dict(token_budget=120, max_length=64, batch_size=4, grad_accum=1, lr=3e-3, weight_decay=0.0,
                    warmup_ratio=0.05, lr_scheduler="cosine", precision="fp32", save_steps=200)
    with pytest.raises(TokenizerMismatchError) as err:
        stage(meter=FakeMeter(), pipeline="sft_gt", dataset=str(data), tokenizer=str(other),
              init_model=str(tmp_path / "init"), out_dir=str(tmp_path / "s1"), training=training, seed=0)
    assert "other_tok" in str(err.value) and "init" in str(err.value)
    assert not (tmp_path / "s1").exists()

    meter = FakeMeter()
    stage(meter=meter, pipeline="sft_gt", dataset=str(data), tokenizer=str(tmp_path / "tok"),
          init_model=str(tmp_path / "init"), out_dir=str(tmp_path / "s2"), training=training, seed=0)
    assert meter.tokens["trained_tokens"] == 120
    assert meter.metrics["dropped_over_max_length"] == 0
    assert (tmp_path / "s2" / "final" / "model.safetensors").is_file()


def test_stale_checkpoints_of_another_config_are_set_aside_not_mixed(tmp_path):
    """The workflow reruns a job when its params change: old checkpoints move aside, training starts fresh."""
    from distill_bench.train.trainer import FINGERPRINT, check_or_write_fingerprint

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    check_or_write_fingerprint(ckpt, {"settings": "a"}, has_checkpoint=False)
    (ckpt / "checkpoint-5").mkdir()
    with pytest.raises(CheckpointMismatchError, match="refusing to mix runs"):
        check_or_write_fingerprint(ckpt, {"settings": "b"}, has_checkpoint=True)
    aside = check_or_write_fingerprint(ckpt, {"settings": "b"}, has_checkpoint=True, stale="set_aside")
    assert aside and (Path(aside) / "checkpoint-5").is_dir(), "the old checkpoints are kept, not deleted"
    assert not (ckpt / "checkpoint-5").exists()
    assert json.loads((ckpt / FINGERPRINT).read_text()) == {"settings": "b"}
    assert check_or_write_fingerprint(ckpt, {"settings": "b"}, has_checkpoint=True, stale="set_aside") is None


def test_loss_positions_trainer_matches_trls_loss_and_gradients(tok, examples, tmp_path):
    """The default SFT trainer projects only loss positions through the head: same loss and gradients as TRL's."""
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from distill_bench.train.trainer import _loss_positions_sft_trainer, _sft_config, _with_labels

    s = settings(batch_size=4)
    batch_examples = _with_labels([{k: e[k] for k in ("input_ids", "completion_mask")} for e in examples[:4]])
    results = []
    for cls in (SFTTrainer, _loss_positions_sft_trainer()):
        m = model(tok, seed=5)
        args = _sft_config(s, tmp_path / cls.__name__, 1, 0, True)
        trainer = cls(model=m, args=args, processing_class=tok, train_dataset=Dataset.from_list(batch_examples))
        batch = trainer.data_collator(batch_examples)
        n_items = int(batch["labels"][:, 1:].ne(-100).sum())
        loss = trainer.compute_loss(m, dict(batch), num_items_in_batch=torch.tensor(n_items))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (ref_loss, ref_grads), (loss, grads) = results
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def test_one_process_seeing_two_gpus_trains_on_one_instead_of_refusing(tok, examples, tmp_path, monkeypatch):
    """Without a launcher, HF's Trainer would wrap the model in nn.DataParallel over every visible GPU, and TRL
    refuses that: a one-process stage on a 2-GPU machine must train on one GPU (SFT/KD and DPO alike)."""
    import functools

    import torch
    import transformers
    from datasets import Dataset

    from distill_bench.dpo.train import _dpo_config
    from distill_bench.train.trainer import _loss_positions_sft_trainer, _sft_config, _with_labels

    def two_gpus(self):   # what TrainingArguments finds in one process that sees two GPUs
        self._n_gpu, self.distributed_state = 2, None
        return torch.device("cpu")

    setup = functools.cached_property(two_gpus)   # computed once per arguments object, like the real one
    setup.__set_name__(transformers.TrainingArguments, "_setup_devices")
    monkeypatch.setattr(transformers.TrainingArguments, "_setup_devices", setup)
    s = settings(batch_size=4)
    args = _sft_config(s, tmp_path / "sft", 1, 0, True)
    assert args.n_gpu == 1
    batch_examples = _with_labels([{k: e[k] for k in ("input_ids", "completion_mask")} for e in examples[:4]])
    _loss_positions_sft_trainer()(model=model(tok, seed=5), args=args, processing_class=tok,
                                  train_dataset=Dataset.from_list(batch_examples))
    dpo_args = _dpo_config(s, {"epochs": 1, "beta": 0.1, "loss_type": "sigmoid", "precompute_ref_logprobs": False},
                           tmp_path / "dpo", 1, 0, True)
    assert dpo_args.n_gpu == 1


def test_uneven_multi_rank_split_is_refused_before_training():
    from distill_bench.train.trainer import check_even_split

    check_even_split(17, 4, 1)          # one rank: a short last batch is fine
    check_even_split(16, 4, 2)
    with pytest.raises(ValueError, match="does not split into whole batches"):
        check_even_split(17, 4, 2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_batch_gives_the_padded_loss_and_gradients(tok, examples, tmp_path, attn):
    """One flattened row with position_ids (no padding) must be the same function as the padded batch: documents
    must not attend to each other. Fails if transformers stops detecting packed position_ids."""
    import torch
    from datasets import Dataset

    from distill_bench.train.collate import LMCollator
    from distill_bench.train.trainer import _loss_positions_sft_trainer, _sft_config, _with_labels

    s = settings(batch_size=4)
    batch_examples = _with_labels([{k: e[k] for k in ("input_ids", "completion_mask")} for e in examples[:4]])
    assert len({len(e["input_ids"]) for e in batch_examples}) > 1, "lengths must differ for padding to exist"
    results = []
    for padding_free in (False, True):
        m = model(tok, seed=5)
        m.set_attn_implementation(attn)
        collator = LMCollator(tok.pad_token_id, padding_free=padding_free)   # the layout train_student uses
        trainer = _loss_positions_sft_trainer()(model=m, args=_sft_config(s, tmp_path / f"pf{padding_free}", 1, 0,
                                                                          True),
                                                processing_class=tok, data_collator=collator,
                                                train_dataset=Dataset.from_list(batch_examples))
        batch = trainer.data_collator(batch_examples)
        batch.pop("num_real_tokens")   # train_student's counting step takes it before the loss
        assert ("position_ids" in batch) is padding_free and batch["input_ids"].shape[0] == (1 if padding_free
                                                                                            else 4)
        n_items = int(batch["labels"][:, 1:].ne(-100).sum())
        loss = trainer.compute_loss(m, dict(batch), num_items_in_batch=torch.tensor(n_items))
        loss.backward()
        results.append((n_items, loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (n_pad, ref_loss, ref_grads), (n_flat, loss, grads) = results
    assert n_pad == n_flat
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def reference_varlen_kernel(calls):
    """Stand-in for torch's CUDA-only flash varlen kernel: causal SDPA per document (same arguments, same layout)."""
    import torch

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        bounds = cu_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.shape[0] and max_q >= max(b - a for a, b in zip(bounds, bounds[1:]))
        calls.append(len(bounds) - 1)
        outs = [torch.nn.functional.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
        return torch.cat(outs)

    return kernel


def test_varlen_attention_gets_document_boundaries_and_gives_the_padded_loss(tok, examples, tmp_path, monkeypatch):
    """training.attn_implementation=varlen: each padding-free row reaches the kernel with its documents' boundaries
    (from the collator, no mask built) and the loss and gradients equal the padded SDPA batch's. The CUDA kernel is
    replaced by a per-document reference here; benchmarks/gpu_trainer.py --checks varlen runs the real one."""
    import torch
    from datasets import Dataset

    from distill_bench.train import varlen
    from distill_bench.train.collate import LMCollator
    from distill_bench.train.trainer import _loss_positions_sft_trainer, _sft_config, _with_labels

    calls = []
    monkeypatch.setattr(varlen, "_kernel", lambda: reference_varlen_kernel(calls))
    s = settings(batch_size=4)
    batch_examples = _with_labels([{k: e[k] for k in ("input_ids", "completion_mask")} for e in examples[:4]])
    results = []
    for padding_free in (False, True):
        m = model(tok, seed=5)
        if padding_free:
            m.set_attn_implementation(varlen.register())
        trainer = _loss_positions_sft_trainer()(
            model=m, args=_sft_config(s, tmp_path / f"v{padding_free}", 1, 0, True), processing_class=tok,
            data_collator=LMCollator(tok.pad_token_id, padding_free=padding_free),
            train_dataset=Dataset.from_list(batch_examples))
        batch = trainer.data_collator(batch_examples)
        batch.pop("num_real_tokens")
        n_items = int(batch["labels"][:, 1:].ne(-100).sum())
        loss = trainer.compute_loss(m, dict(batch), num_items_in_batch=torch.tensor(n_items))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    assert calls and set(calls) == {4}   # every layer's call saw the 4 documents
    (ref_loss, ref_grads), (loss, grads) = results
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)
    padded = LMCollator(tok.pad_token_id)(batch_examples[:2])
    with pytest.raises(ValueError, match="padding-free"):   # never attends without a mask
        m(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])


def test_train_student_with_varlen_saves_a_model_with_its_own_attention(tok, examples, tmp_path, monkeypatch):
    from distill_bench.train import varlen

    calls = []
    monkeypatch.setattr(varlen, "_kernel", lambda: reference_varlen_kernel(calls))
    m = model(tok)
    summary = train_student(model=m, tokenizer=tok, examples=examples[:16], seed=0, output_dir=tmp_path / "run",
                            settings=settings(attn_implementation="varlen", padding_free=True))
    assert calls and summary["padding_free"] is True and summary["trained_tokens"] == 300
    assert m.config._attn_implementation == "sdpa"
    assert "distill_bench" not in (tmp_path / "run" / "final" / "config.json").read_text()
    with pytest.raises(ValueError, match="varlen needs padding-free"):
        train_student(model=model(tok), tokenizer=tok, examples=examples[:16], seed=0, output_dir=tmp_path / "r2",
                      settings=settings(attn_implementation="varlen", padding_free=False))


def test_varlen_under_activation_checkpointing_learns_the_same_model(tok, examples, tmp_path, monkeypatch):
    """The cluster config trains with activation checkpointing: the recomputed forward must reach the varlen kernel
    with the same document boundaries, so the trained weights equal a run without checkpointing."""
    import torch

    from distill_bench.train import varlen

    calls = []
    monkeypatch.setattr(varlen, "_kernel", lambda: reference_varlen_kernel(calls))
    weights_by_mode = {}
    for ckpt in (False, True):
        out = tmp_path / f"ckpt{ckpt}"
        train_student(model=model(tok), tokenizer=tok, examples=examples[:16], seed=0, output_dir=out,
                      settings=settings(attn_implementation="varlen", padding_free=True,
                                        gradient_checkpointing=ckpt))
        weights_by_mode[ckpt] = (weights(out), len(calls))
    (plain, n_plain), (ckpt, n_all) = weights_by_mode[False], weights_by_mode[True]
    assert n_all - n_plain > n_plain          # the recompute called the kernel again
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


def test_auto_attention_picks_varlen_only_for_plain_causal_models_on_a_gpu(tok, examples, tmp_path, monkeypatch):
    from transformers import LlamaConfig, MistralConfig

    from distill_bench.train import varlen

    llama = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    llama._attn_implementation = "sdpa"
    windowed = MistralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             sliding_window=16)
    windowed._attn_implementation = "sdpa"
    monkeypatch.setattr(varlen, "available", lambda: True)
    assert varlen.auto_applies(llama) and not varlen.auto_applies(windowed)
    llama._attn_implementation = "flex_attention"          # a configured kernel stays
    assert not varlen.auto_applies(llama)
    monkeypatch.setattr(varlen, "available", lambda: False)   # no CUDA / torch < 2.10
    llama._attn_implementation = "sdpa"
    assert not varlen.auto_applies(llama)
    assert TrainSettings.from_dict({"token_budget": 5, "max_length": 10}).attn_implementation == "auto"
    summary = train_student(model=model(tok), tokenizer=tok, examples=examples[:16], seed=0,
                            output_dir=tmp_path / "run", settings=settings())
    assert summary["attn_implementation"] == "sdpa"        # CPU: auto keeps the model's own


def test_every_layout_counts_real_tokens_only_and_learns_the_padded_runs_model(tok, examples, tmp_path):
    """Padding-free rows and bucketed lengths (pad tails) change the layout, never the tokens counted or learned."""
    import torch

    layouts = [(False, None), (True, None), (True, 16), (False, 16)]
    runs = {}
    for padding_free, multiple in layouts:
        meter = FakeMeter()
        out = tmp_path / f"pf{padding_free}_{multiple}"
        res = train_student(model=model(tok), tokenizer=tok, examples=examples, seed=0, output_dir=out, meter=meter,
                            settings=settings(padding_free=padding_free, pad_to_multiple_of=multiple))
        assert res["padding_free"] is padding_free and meter.metrics["padding_free"] is padding_free
        assert meter.metrics["attn_implementation"] == "sdpa"   # resolved, as the stage record shows it
        assert res["pad_to_multiple_of"] == multiple
        runs[padding_free, multiple] = (res, meter, weights(out))
    stream, _ = build_budgeted_dataset(examples, 300, 0)
    real = sum(len(e["input_ids"]) for e in stream)
    r0, m0, w0 = runs[False, None]
    for key, (res, meter, w) in runs.items():
        assert res["trained_tokens"] == 300 and meter.tokens["input_tokens"] == real, key
        assert all(torch.allclose(w0[k], w[k], atol=1e-5) for k in w0), key


@pytest.mark.parametrize("padding_free", [False, True])
def test_collator_finds_loss_positions_on_the_cpu_and_gpu_steps_need_no_host_sync(tok, examples, tmp_path,
                                                                                  padding_free):
    """Each host read of a GPU tensor stalls the step (docs/BENCHMARKS.md, third round): the loss positions and
    their count come from the collator, HF's per-step NaN filter is off and batches are copied without blocking."""
    from distill_bench.train.collate import LOSS_POSITIONS, LOSS_TOKENS, LMCollator
    from distill_bench.train.collate import loss_positions_of
    from distill_bench.train.trainer import training_arguments

    batch = LMCollator(tok.pad_token_id, padding_free=padding_free, pad_to_multiple_of=16)(examples[:4])
    labels = batch["labels"]
    rows, cols, targets = (batch[k] for k in LOSS_POSITIONS)
    want = loss_positions_of({"labels": labels})   # found from the labels (the fallback for other collators)
    assert all(x.device.type == "cpu" and x.equal(y) for x, y in zip((rows, cols, targets), want))
    assert batch[LOSS_TOKENS] == int(labels[:, 1:].ne(-100).sum()) == targets.numel() > 0
    assert targets.equal(labels[:, 1:][rows, cols])
    gpu = training_arguments(settings(), tmp_path, 10, 0, use_cpu=False)
    assert gpu["logging_nan_inf_filter"] is False and gpu["accelerator_config"] == {"non_blocking": True}
    assert training_arguments(settings(), tmp_path, 10, 0, use_cpu=True)["accelerator_config"] is None


def test_trainer_counts_the_model_parameters_once_for_its_flop_total(tok, examples, tmp_path, monkeypatch):
    """HF would walk every module for the count at each micro-batch; the total it reports stays HF's."""
    from transformers import TrainerCallback

    import distill_bench.train.trainer as trainer_module

    def run(name: str) -> tuple[float, int, int]:
        m = model(tok)
        walks = []
        real_count = type(m).num_parameters

        def counting(self, *args, **kwargs):
            walks.append(kwargs)
            return real_count(self, *args, **kwargs)

        seen = {}

        class Flos(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                seen["total_flos"] = state.total_flos

        monkeypatch.setattr(type(m), "num_parameters", counting)
        res = train_student(model=m, tokenizer=tok, examples=examples, settings=settings(batch_size=2), seed=0,
                            output_dir=tmp_path / name, trainer_kwargs={"callbacks": [Flos()]})
        monkeypatch.undo()
        return seen["total_flos"], walks.count({"exclude_embeddings": True}), res["steps"]

    ours, our_walks, steps = run("ours")
    counting_class = trainer_module._counting_trainer_class

    def with_hf_flops(base):   # the same trainer with HF's own per-micro-batch count
        cls = counting_class(base)
        return type(cls.__name__, (cls,), {"floating_point_ops": base.floating_point_ops})

    monkeypatch.setattr(trainer_module, "_counting_trainer_class", with_hf_flops)
    hf, hf_walks, _ = run("hf")
    assert steps >= 4 and our_walks == 1 and hf_walks >= steps
    assert ours == hf > 0


def test_speed_settings_are_validated_and_auto_padding_free_is_gpu_only():
    from distill_bench.train.speed import resolve_compile, resolve_padding_free

    assert [resolve_compile(v, on_gpu=True) for v in (False, True, "layers", "none", "auto")] == [
        "none", "model", "layers", "none", "layers"]
    assert resolve_compile("auto", on_gpu=False) == "none"
    with pytest.raises(ValueError, match="torch_compile"):
        settings(torch_compile="regional")
    with pytest.raises(ValueError, match="padding_free"):
        settings(padding_free="yes")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        settings(pad_to_multiple_of=0)
    from distill_bench.train.speed import resolve_pad_multiple

    assert [resolve_pad_multiple("auto", on_gpu=g) for g in (True, False)] == [64, None]
    assert resolve_padding_free("auto", on_gpu=True, attn_implementation=None) is True
    assert resolve_padding_free("auto", on_gpu=False, attn_implementation="sdpa") is False
    assert resolve_padding_free(True, on_gpu=False, attn_implementation=None) is True


def test_a_nan_loss_stops_training_at_that_step_bills_its_tokens_and_saves_no_model(tok, examples, tmp_path):
    from distill_bench.train.trainer import TrainingDiverged, _loss_positions_sft_trainer

    class NanFromStepThree(_loss_positions_sft_trainer()):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("nan") if self.state.global_step >= 2 else loss

    meter = FakeMeter()
    s = settings(batch_size=2)
    with pytest.raises(TrainingDiverged, match=r"loss nan at optimizer step 3 of \d+ \(grad_norm nan\)"):
        train_student(model=model(tok), tokenizer=tok, examples=examples, settings=s, seed=0,
                      output_dir=tmp_path / "run", meter=meter, trainer_cls=NanFromStepThree)
    stream, _ = build_budgeted_dataset(examples, s.token_budget, 0)
    from distill_bench.train.budget import trained_positions

    assert meter.tokens["trained_tokens"] == sum(trained_positions(e["completion_mask"]) for e in stream[:6])
    assert not (tmp_path / "run" / "final").exists()


def test_fsdp_trains_uncompiled_under_auto_and_refuses_compiled_layers():
    from distill_bench.train.speed import resolve_compile, resolve_gpu_defaults

    assert resolve_compile("auto", on_gpu=True, sharded=True) == "none"
    assert resolve_compile("layers", on_gpu=True, sharded=False) == "layers"

    class Config:
        model_type, _attn_implementation = "olmo2", "sdpa"

    fsdp = {"gpus": 2, "distributed": "fsdp"}
    assert resolve_gpu_defaults(fsdp, Config(), on_gpu=True, varlen_available=True)["torch_compile"] == "none"
    assert resolve_gpu_defaults({**fsdp, "distributed": "ddp"}, Config(), on_gpu=True,
                                varlen_available=True)["torch_compile"] == "layers"
    with pytest.raises(ValueError, match="training.torch_compile 'layers' with training.distributed fsdp on 2 "
                                         "processes: each decoder layer would be compiled before FSDP shards it"):
        settings(torch_compile="layers", **fsdp)
    assert settings(torch_compile="layers", gpus=2, distributed="ddp").torch_compile == "layers"
    assert settings(torch_compile="layers", gpus=1, distributed="fsdp").torch_compile == "layers"


def test_layer_compiled_student_trains_the_eager_model(tok, examples, tmp_path):
    """training.torch_compile: layers compiles each decoder layer in place: same learning, portable weights."""
    import torch

    from distill_bench.train.speed import decoder_layers

    m = model(tok)
    layers = decoder_layers(m)
    assert len(layers) == m.config.num_hidden_layers
    eager = train_student(model=model(tok), tokenizer=tok, examples=examples, settings=settings(token_budget=120),
                          seed=0, output_dir=tmp_path / "eager")
    compiled = train_student(model=m, tokenizer=tok, examples=examples,
                             settings=settings(token_budget=120, torch_compile="layers"), seed=0,
                             output_dir=tmp_path / "layers")
    assert compiled["torch_compile"] == "layers" and eager["torch_compile"] == "none"
    assert all(layer._compiled_call_impl is not None for layer in layers)
    we, wc = weights(tmp_path / "eager"), weights(tmp_path / "layers")
    assert sorted(we) == sorted(wc), "state-dict keys unchanged (no _orig_mod prefix)"
    assert all(torch.allclose(we[k], wc[k], atol=1e-4) for k in we)


def test_one_seed_trained_twice_on_the_cpu_gives_bit_identical_weights(tok, examples, tmp_path):
    """Why the README's two example runs repeat every verdict: CPU training of a seed is deterministic (the same
    students, so the same greedy evaluations); another seed is another data order and another model."""
    import torch

    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        train_student(model=model(tok), tokenizer=tok, examples=examples, settings=settings(token_budget=200),
                      seed=seed, output_dir=tmp_path / name, meter=FakeMeter())
        runs[name] = weights(tmp_path / name)
    assert runs["a"].keys() == runs["b"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["other"][k]) for k in runs["a"])
