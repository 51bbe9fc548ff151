"""training.optim: adamw_fused_clip (the gradient-norm clip inside fused AdamW) makes the same update as HF's
clip_grad_norm_ followed by fused AdamW, alone and through the trainer; settings refuse it with FSDP and with fp16.
The logged gradient norm costs no extra pass over the gradients."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from conftest import TINY_ARCH, arith_pairs, train_arith_tokenizer  # noqa: E402
from distill_bench.train.optim import clipped_fused_adamw_class  # noqa: E402
from distill_bench.train.trainer import TrainSettings  # noqa: E402


@pytest.mark.parametrize("grad_size", [10.0, 1e-3])   # clipped, and below the threshold
def test_clip_inside_fused_adamw_equals_clip_then_fused_adamw(grad_size):
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s) for s in shapes]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    opt_ours = clipped_fused_adamw_class()(ours, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for step in range(4):
        grads = [torch.randn(s) * grad_size * (step + 1) for s in shapes]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        opt_ours.step()
        assert float(opt_ours.last_grad_norm) == pytest.approx(float(norm), rel=1e-6)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert getattr(opt_ours, "grad_scale", None) is None   # never left behind for a later step


def _arith_examples(tmp_path):
    from distill_bench.models.tokenizer import encode_prompt_response, load_tokenizer

    tok = load_tokenizer(train_arith_tokenizer(tmp_path / "tok", 40, 100))
    examples = []
    for i, (p, r) in enumerate(arith_pairs(24)):
        e = encode_prompt_response(tok, p, r, 64)
        if e is not None:
            e["example_index"] = i
            examples.append(e)
    return tok, examples


def _train_logging_grad_norms(tmp_path, tok, examples, name: str, **training) -> tuple[dict, list[float]]:
    """train_student on 16 examples, logging every step; (summary, the logged gradient norms)."""
    from transformers import TrainerCallback

    from distill_bench.models.build import init_model_from_arch
    from distill_bench.train.trainer import train_student

    norms: list[float] = []

    class GradNorms(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                norms.append(float(logs["grad_norm"]))

    budget = sum(sum(e["completion_mask"]) for e in examples[:16])
    settings = TrainSettings.from_dict({"token_budget": budget, "max_length": 64, "batch_size": 4, "lr": 1e-2,
                                        "lr_scheduler": "constant", "precision": "fp32", "logging_steps": 1,
                                        **training})
    summary = train_student(model=init_model_from_arch(TINY_ARCH, tok, seed=0), tokenizer=tok, examples=examples,
                            settings=settings, seed=0, output_dir=tmp_path / name,
                            trainer_kwargs={"callbacks": [GradNorms()]})
    return summary, norms


def test_trainer_with_the_folded_clip_learns_what_the_default_optimizer_learns(tmp_path):
    tok, examples = _arith_examples(tmp_path)
    curves, norms = {}, {}
    for optim in ("auto", "adamw_fused_clip"):
        # max_grad_norm far below the gradient norms: every step is clipped, so a missing clip would show
        summary, norms[optim] = _train_logging_grad_norms(tmp_path, tok, examples, optim, max_grad_norm=0.05,
                                                          optim=optim)
        curves[optim] = [loss for _, loss in summary["loss_curve"]]
    assert len(curves["auto"]) >= 4
    assert curves["adamw_fused_clip"] == pytest.approx(curves["auto"], rel=1e-5)
    assert min(norms["auto"]) > 0.05   # clipped steps: the logged norm is the one before clipping
    assert norms["adamw_fused_clip"] == pytest.approx(norms["auto"], rel=1e-5)


@pytest.mark.parametrize("optim, max_grad_norm", [("adamw_fused_clip", 0.05), ("auto", 0.0)])
def test_logged_gradient_norm_takes_one_norm_pass_and_never_rescales_gradients(tmp_path, monkeypatch, optim,
                                                                                max_grad_norm):
    """HF's own way with its clip off is clip_grad_norm_(max_norm=inf): a norm, then every gradient times 1."""
    tok, examples = _arith_examples(tmp_path)
    calls = {"clip_grad_norm_": 0, "_foreach_norm": 0}
    clip, foreach_norm = torch.nn.utils.clip_grad_norm_, torch._foreach_norm

    def counting_clip(*args, **kwargs):
        calls["clip_grad_norm_"] += 1
        return clip(*args, **kwargs)

    def counting_norm(*args, **kwargs):
        calls["_foreach_norm"] += 1
        return foreach_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    monkeypatch.setattr(torch, "_foreach_norm", counting_norm)
    summary, norms = _train_logging_grad_norms(tmp_path, tok, examples, optim, max_grad_norm=max_grad_norm,
                                               optim=optim)
    steps = summary["steps"]
    assert steps >= 4 and len(norms) >= steps
    assert all(n > 0 and n == n for n in norms)
    assert calls["clip_grad_norm_"] == 0
    assert calls["_foreach_norm"] <= steps   # one norm per optimizer step at most (none where torch loops per tensor)
    if optim == "adamw_fused_clip":
        assert calls["_foreach_norm"] == steps


def test_folded_clip_is_refused_with_fsdp_and_with_fp16():
    with pytest.raises(ValueError, match="adamw_fused_clip.*fsdp"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "gpus": 2, "distributed": "fsdp",
                                 "optim": "adamw_fused_clip"})
    with pytest.raises(ValueError, match="training.optim 'adamw_fused_clip' with training.precision fp16"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "precision": "fp16", "optim": "adamw_fused_clip"})
    with pytest.raises(ValueError, match="training.optim"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "optim": "sgd"})
