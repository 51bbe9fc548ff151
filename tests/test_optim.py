"""training.optim: adamw_fused_clip (the gradient-norm clip inside fused AdamW) makes the same update as HF's
clip_grad_norm_ followed by fused AdamW, alone and through the trainer; settings refuse it with FSDP."""
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


def test_trainer_with_the_folded_clip_learns_what_the_default_optimizer_learns(tmp_path):
    from distill_bench.models.build import init_model_from_arch
    from distill_bench.models.tokenizer import encode_prompt_response, load_tokenizer
    from distill_bench.train.trainer import train_student

    tok = load_tokenizer(train_arith_tokenizer(tmp_path / "tok", 40, 100))
    examples = []
    for i, (p, r) in enumerate(arith_pairs(24)):
        e = encode_prompt_response(tok, p, r, 64)
        if e is not None:
            e["example_index"] = i
            examples.append(e)
    budget = sum(sum(e["completion_mask"]) for e in examples[:16])
    curves = {}
    for optim in ("auto", "adamw_fused_clip"):
        # max_grad_norm far below the gradient norms: every step is clipped, so a missing clip would show
        settings = TrainSettings.from_dict({"token_budget": budget, "max_length": 64, "batch_size": 4, "lr": 1e-2,
                                            "lr_scheduler": "constant", "precision": "fp32", "logging_steps": 1,
                                            "max_grad_norm": 0.05, "optim": optim})
        summary = train_student(model=init_model_from_arch(TINY_ARCH, tok, seed=0), tokenizer=tok,
                                examples=examples, settings=settings, seed=0, output_dir=tmp_path / optim)
        curves[optim] = [loss for _, loss in summary["loss_curve"]]
    assert len(curves["auto"]) >= 4
    assert curves["adamw_fused_clip"] == pytest.approx(curves["auto"], rel=1e-5)


def test_folded_clip_is_refused_with_fsdp():
    with pytest.raises(ValueError, match="adamw_fused_clip.*fsdp"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "gpus": 2, "distributed": "fsdp",
                                 "optim": "adamw_fused_clip"})
    with pytest.raises(ValueError, match="training.optim"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "optim": "sgd"})
