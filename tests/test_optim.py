"""training.optim: the folded-clip AdamWs (adamw_fused_clip: the clip inside fused AdamW; adamw_compiled_clip: the
same update compiled by Inductor) make the same update as HF's clip_grad_norm_ followed by AdamW, alone and through
the trainer; settings refuse them with FSDP and with fp16; ``auto`` picks the compiled one only where it runs and
repays its compile time. The logged gradient norm costs no extra pass over the gradients."""
from __future__ import annotations

import io
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from conftest import TINY_ARCH, arith_pairs, train_arith_tokenizer  # noqa: E402
from distill_bench.train import optim  # noqa: E402
from distill_bench.train.optim import (clipped_fused_adamw_class, compiled_clip_adamw_class,  # noqa: E402
                                       resolve_optim)
from distill_bench.train.trainer import TrainSettings  # noqa: E402

FOLDED = {"adamw_fused_clip": clipped_fused_adamw_class, "adamw_compiled_clip": compiled_clip_adamw_class}
SHAPES = [(7, 5), (5,), (3, 4, 2)]


def _groups(params):
    """The trainer's layout: decay on matrices, none on vectors."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _steps(opt, params, grads_per_step, schedule=None):
    norms = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        norms.append(float(opt.last_grad_norm))
        if schedule is not None:
            schedule.step()
    return norms


@pytest.mark.parametrize("name", FOLDED)
@pytest.mark.parametrize("grad_size", [10.0, 1e-3])   # clipped, and below the threshold
def test_folded_clip_equals_clip_then_adamw(name, grad_size):
    """Two weight-decay groups and a learning rate that changes every step, as the trainer runs them."""
    torch.manual_seed(0)
    start = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) * grad_size * (step + 1) for s in SHAPES] for step in range(4)]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2, fused=True)
    opt_ours = FOLDED[name]()(_groups(ours), lr=1e-2, max_grad_norm=1.0)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda s: 1 / (s + 1))
    sched_ours = torch.optim.lr_scheduler.LambdaLR(opt_ours, lambda s: 1 / (s + 1))
    for step_grads in grads:
        for p, g in zip(ref, step_grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        sched_ref.step()
        for p, g in zip(ours, step_grads):
            p.grad = g.clone()
        opt_ours.step()
        sched_ours.step()
        assert float(opt_ours.last_grad_norm) == pytest.approx(float(norm), rel=1e-6)
    for a, b in zip(ref, ours):
        # the compiled update rounds its divisions in another order than torch's kernels: a few float32 ulps
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert getattr(opt_ours, "grad_scale", None) is None   # never left behind for a later step


@pytest.mark.parametrize("name", FOLDED)
def test_folded_clip_keeps_adamws_step_count_per_parameter(name):
    """A parameter without a gradient in a step is skipped, as AdamW skips it: its bias correction lags the others'."""
    torch.manual_seed(4)
    start = [torch.randn(s) for s in SHAPES]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2)
    opt_ours = FOLDED[name]()(_groups(ours), lr=1e-2, max_grad_norm=1.0)
    for step in range(4):
        grads = [None if (step == 1 and i == 0) else torch.randn(s) * 10 for i, s in enumerate(SHAPES)]
        for params, opt in ((ref, opt_ref), (ours, opt_ours)):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            if opt is opt_ref:
                torch.nn.utils.clip_grad_norm_(ref, 1.0)
            opt.step()
    assert [float(opt_ours.state[p]["step"]) for p in ours] == [3.0, 4.0, 4.0]
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_compiled_clip_compiles_once_per_group_not_per_learning_rate():
    from torch._dynamo.utils import counters

    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(9, 3), (3,)]]
    opt = compiled_clip_adamw_class()(_groups(params), lr=1e-2, max_grad_norm=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    before = counters["stats"]["unique_graphs"]
    _steps(opt, params, [[torch.randn_like(p) for p in params] for _ in range(5)], schedule)
    assert counters["stats"]["unique_graphs"] - before <= 2   # one graph per group at most, five learning rates
    assert opt.compiled


def test_compiled_clip_compiles_for_every_model_a_process_trains_past_dynamos_recompile_limit(caplog):
    """A sweep or a test session builds many models in one process: their graphs must not add up against Dynamo's
    recompile limit (one shared compiled function failed a test session so), even where one model's groups alone
    outnumber it."""
    torch.manual_seed(4)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, logger=optim.__name__):
        for width in (6, 8):   # two models of other shapes, two groups each: four graphs against a limit of one
            params = [torch.nn.Parameter(torch.randn(s)) for s in [(width, 3), (width,)]]
            opt = compiled_clip_adamw_class()(_groups(params), lr=1e-2, max_grad_norm=1.0)
            _steps(opt, params, [[torch.randn_like(p) for p in params] for _ in range(2)])
            assert opt.compiled
    assert not [r for r in caplog.records if "uncompiled" in r.getMessage()]


def test_compiled_clip_reuses_the_compile_for_the_next_optimizer_over_the_same_shapes():
    """A repeat or a resumed run in the same process pays the compile once."""
    from torch._dynamo.utils import counters

    def run(shapes):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = compiled_clip_adamw_class()(_groups(params), lr=1e-2, max_grad_norm=1.0)
        before = counters["stats"]["unique_graphs"]
        _steps(opt, params, [[torch.randn_like(p) for p in params] for _ in range(2)])
        return counters["stats"]["unique_graphs"] - before

    torch.manual_seed(5)
    assert run([(11, 5), (11,)]) >= 1   # new shapes: compiled
    assert run([(11, 5), (11,)]) == 0   # the same shapes again: no new graph
    assert run([(12, 5), (12,)]) >= 1


def _checkpointed(state_dict):
    """The state dict as a checkpoint gives it back: saved and loaded (state_dict() returns the live tensors)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


def test_compiled_clip_state_is_adamws_own():
    """A checkpoint's optimizer state moves between adamw_compiled_clip and torch's AdamW either way."""
    torch.manual_seed(2)
    start = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) * 1e-3 for s in SHAPES] for _ in range(4)]
    a = [torch.nn.Parameter(x.clone()) for x in start]
    compiled = compiled_clip_adamw_class()(_groups(a), lr=1e-2, max_grad_norm=1.0)
    _steps(compiled, a, grads[:2])
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    plain = torch.optim.AdamW(_groups(b), lr=1e-2)
    plain.load_state_dict(_checkpointed(compiled.state_dict()))
    _steps(compiled, a, grads[2:])
    for step_grads in grads[2:]:   # unclipped gradients (norm far below 1): plain AdamW needs no clip
        for p, g in zip(b, step_grads):
            p.grad = g.clone()
        plain.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6)
    back = compiled_clip_adamw_class()(_groups([torch.nn.Parameter(x.detach().clone()) for x in b]), lr=1e-2,
                                       max_grad_norm=1.0)
    back.load_state_dict(_checkpointed(plain.state_dict()))
    assert all(float(s["step"]) == 4 for s in back.state.values())


def test_compiled_clip_runs_uncompiled_with_a_warning_when_inductor_cannot_build_it(monkeypatch, caplog):
    def refuses(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("no graph for this update")

    monkeypatch.setattr(optim, "_compiled_update", lambda signature: refuses)
    torch.manual_seed(3)
    start = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) * 10 for s in SHAPES] for _ in range(3)]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    _steps(clipped_fused_adamw_class()(_groups(ref), lr=1e-2, max_grad_norm=1.0), ref, grads)
    opt = compiled_clip_adamw_class()(_groups(ours), lr=1e-2, max_grad_norm=1.0)
    with caplog.at_level(logging.WARNING, logger=optim.__name__):
        _steps(opt, ours, grads)
    assert not opt.compiled
    assert sum("running it uncompiled" in r.getMessage() for r in caplog.records) == 1
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def _settings(**training):
    return TrainSettings.from_dict({"token_budget": 5, "max_length": 8, **training})


@pytest.mark.parametrize("training, on_gpu, parameters, steps, expected", [
    ({}, True, 1_500_000_000, 10_000, "adamw_compiled_clip"),          # a 1B study run on a GPU
    ({}, True, 1_500_000_000, 100, "auto"),                            # too short to repay the compile
    ({}, True, 10_000_000, 10_000, "auto"),                            # too small to repay it
    ({}, False, 1_500_000_000, 10_000, "auto"),                        # CPU: HF's default
    ({"precision": "fp16"}, True, 1_500_000_000, 10_000, "auto"),
    ({"max_grad_norm": 0.0}, True, 1_500_000_000, 10_000, "auto"),
    ({"gpus": 2, "distributed": "fsdp"}, True, 1_500_000_000, 10_000, "auto"),
    ({"gpus": 2, "distributed": "ddp"}, True, 1_500_000_000, 10_000, "adamw_compiled_clip"),
    ({"optim": "adamw_torch"}, True, 1_500_000_000, 10_000, "adamw_torch"),   # a name is kept as given
    ({"optim": "adamw_compiled_clip"}, False, 1000, 1, "adamw_compiled_clip"),
])
def test_auto_optimizer_is_the_compiled_clip_where_it_runs_and_repays_its_compile(training, on_gpu, parameters,
                                                                                  steps, expected):
    assert resolve_optim(_settings(**training), on_gpu=on_gpu, parameters=parameters, steps=steps) == expected


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


def hf_default_optimizer(tmp_path) -> str:
    from transformers import TrainingArguments

    name = TrainingArguments(output_dir=str(tmp_path / "hf_args"), use_cpu=True, report_to="none").optim
    assert name != "auto"
    return name.value


def test_trainer_with_a_folded_clip_learns_what_the_default_optimizer_learns(tmp_path):
    tok, examples = _arith_examples(tmp_path)
    curves, norms, recorded = {}, {}, {}
    for name in ("auto", *FOLDED):
        # max_grad_norm far below the gradient norms: every step is clipped, so a missing clip would show
        summary, norms[name] = _train_logging_grad_norms(tmp_path, tok, examples, name, max_grad_norm=0.05,
                                                         optim=name)
        curves[name] = [loss for _, loss in summary["loss_curve"]]
        recorded[name] = summary["optim"]
    # auto on a CPU is HF's default, recorded by the name HF gave it (never "auto")
    assert recorded == {"auto": hf_default_optimizer(tmp_path), **{name: name for name in FOLDED}}
    assert len(curves["auto"]) >= 4
    assert min(norms["auto"]) > 0.05   # clipped steps: the logged norm is the one before clipping
    for name in FOLDED:
        assert curves[name] == pytest.approx(curves["auto"], rel=1e-5)
        assert norms[name] == pytest.approx(norms["auto"], rel=1e-5)


@pytest.mark.parametrize("optim, max_grad_norm", [("adamw_fused_clip", 0.05), ("adamw_compiled_clip", 0.05),
                                                   ("auto", 0.0)])
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
    if optim in FOLDED:
        assert calls["_foreach_norm"] == steps


@pytest.mark.parametrize("name", FOLDED)
def test_folded_clip_is_refused_with_fsdp_and_with_fp16(name):
    with pytest.raises(ValueError, match=f"{name}.*fsdp"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "gpus": 2, "distributed": "fsdp",
                                 "optim": name})
    with pytest.raises(ValueError, match=f"training.optim '{name}' with training.precision fp16"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "precision": "fp16", "optim": name})
    with pytest.raises(ValueError, match="training.optim"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "optim": "sgd"})
