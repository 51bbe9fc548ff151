"""AdamW with the gradient-norm clip folded into the update (``training.optim: adamw_fused_clip`` and
``adamw_compiled_clip``).

Why: at a 1B student's batch 4 the optimizer step is a fixed cost of about a sixth of the step (docs/BENCHMARKS.md),
and it is bound by memory traffic. HF's step is clip_grad_norm_ (read every gradient for the norm, then read and write
every gradient again to scale it) followed by AdamW (read parameter, gradient and both moments, write three). The
scaling pass is a full extra read + write of the fp32 gradients. Both optimizers here apply the clip coefficient inside
the update instead: same update, one pass over the gradients fewer, no host synchronisation (the coefficient stays a
device tensor).

- ``adamw_fused_clip``: torch's fused AdamW, which already divides gradients by a ``grad_scale`` tensor inside its
  kernel (the hook AMP's GradScaler uses); the clip travels there.
- ``adamw_compiled_clip``: the same update written as foreach ops and compiled by Inductor into kernels that read
  each element's parameter, gradient and moments once and write parameter and moments once. Its state is AdamW's
  (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints move between the two and plain AdamW.

The Trainer logs a gradient norm every step; with its own clip off it would compute one itself, through
``clip_grad_norm_(max_norm=inf)``: a second norm pass and a multiply of every gradient by 1. The trainers ask these
optimizers for their norm instead (``clip_norm``, computed once per step and reused by ``step``).

Single process or DDP only (DDP's gradients are identical on every rank, so the local norm is the global one); with
FSDP each rank holds a shard and the norm would need an all-reduce, which this does not do.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

from distill_bench.defaults import is_sharded

log = logging.getLogger(__name__)

NAME = "adamw_fused_clip"
COMPILED_NAME = "adamw_compiled_clip"
# the optimizers that clip inside their step (HF's own clip must be off for them)
FOLDED_CLIP = (NAME, COMPILED_NAME)
# torch.nn.utils.clip_grad_norm_'s guard against a zero norm, kept so the coefficient is the same
CLIP_EPS = 1e-6
# What ``auto`` weighs, measured on an H200 at a 1B student (docs/BENCHMARKS.md): the compiled step saved
# 17.15 - 11.70 ms per optimizer step over 1,484,916,736 parameters against HF's clip + fused AdamW (both bound by
# memory traffic, so the saving scales with the parameters), and compiling it added 16 s to the trainer's warm-up
COMPILED_SAVES_S_PER_PARAMETER_STEP = (17.15e-3 - 11.70e-3) / 1_484_916_736
COMPILE_S = 16.0


@functools.cache
def _optimizer_classes() -> dict[str, type]:
    """The optimizer classes by config name (built on first use: importing this module does not import torch)."""
    import torch

    class FoldedClipAdamW(torch.optim.AdamW):
        """AdamW whose step clips by the global gradient norm, computed once (``clip_norm``)."""

        def __init__(self, params, *, max_grad_norm: float, **kwargs: Any):
            if not max_grad_norm or max_grad_norm <= 0:
                raise ValueError(f"{type(self).config_name} needs a positive training.max_grad_norm, "
                                 f"got {max_grad_norm!r}")
            super().__init__(params, **kwargs)
            self.max_grad_norm = float(max_grad_norm)
            self.last_grad_norm: torch.Tensor | None = None
            self._step_norm: torch.Tensor | None = None

        @torch.no_grad()
        def clip_norm(self) -> torch.Tensor | None:
            """This step's gradient norm before clipping (a device tensor; None without gradients). Computed once:
            the coming ``step`` clips with it."""
            if self._step_norm is None:
                grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
                if not grads:
                    return None
                # the same norm as torch.nn.utils.clip_grad_norm_ (error_if_nonfinite=False)
                self._step_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
                self.last_grad_norm = self._step_norm
            return self._step_norm

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            norm = self.clip_norm()
            try:
                if norm is not None:
                    self._clipped_step(norm)
            finally:
                self._step_norm = None
            return loss

        def _clipped_step(self, norm: torch.Tensor) -> None:
            raise NotImplementedError

    class ClippedFusedAdamW(FoldedClipAdamW):
        config_name = NAME

        def __init__(self, params, *, max_grad_norm: float, **kwargs: Any):
            kwargs["fused"] = True
            super().__init__(params, max_grad_norm=max_grad_norm, **kwargs)
            self.grad_scale = None

        def _clipped_step(self, norm: torch.Tensor) -> None:
            # fused AdamW divides each gradient by grad_scale: 1 / min(1, max_norm / (norm + eps))
            self.grad_scale = torch.clamp((norm + CLIP_EPS) / self.max_grad_norm, min=1.0).float()
            try:
                torch.optim.AdamW.step(self)
            finally:
                self.grad_scale = None

    class CompiledClipAdamW(FoldedClipAdamW):
        config_name = COMPILED_NAME

        def __init__(self, params, *, max_grad_norm: float, **kwargs: Any):
            super().__init__(params, max_grad_norm=max_grad_norm, **kwargs)
            for group in self.param_groups:
                if group["amsgrad"] or group["maximize"] or group["differentiable"]:
                    raise ValueError(f"{COMPILED_NAME} implements plain AdamW (no amsgrad, maximize or "
                                     "differentiable)")
            self._lr_tensors: dict[int, torch.Tensor] = {}
            self.compiled = True   # False once Inductor could not build the update and the eager one runs instead
            self._updates: dict[int, tuple[tuple[int, ...], Any]] = {}   # group -> (its params' ids, compiled update)

        def _state(self, p: torch.Tensor) -> dict:
            state = self.state[p]
            if not state:   # AdamW's own layout
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:   # a checkpoint of uncompiled AdamW keeps its step on the host
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            return state

        def _lr(self, index: int, group: dict, device: torch.device) -> torch.Tensor:
            """The group's learning rate as a device scalar: a schedule's new value each step is a fill, not a new
            constant baked into (and recompiling) the graph."""
            if torch.is_tensor(group["lr"]):
                return group["lr"]
            lr = self._lr_tensors.get(index)
            if lr is None or lr.device != device:
                lr = self._lr_tensors[index] = torch.empty((), dtype=torch.float32, device=device)
            return lr.fill_(group["lr"])

        def _update_for(self, index: int, params: list, args: tuple):
            """The group's compiled update, looked up by signature only when its parameters with a gradient change
            (a signature walks every tensor: host time each step would spend for nothing)."""
            ids = tuple(map(id, params))
            cached = self._updates.get(index)
            if cached is None or cached[0] != ids:
                cached = self._updates[index] = (ids, _compiled_update(_update_signature(args)))
            return cached[1]

        def _clipped_step(self, norm: torch.Tensor) -> None:
            for index, group in enumerate(self.param_groups):
                params = [p for p in group["params"] if p.grad is not None]
                if not params:
                    continue
                if any(p.grad.is_sparse for p in params):
                    raise RuntimeError(f"{COMPILED_NAME} does not support sparse gradients")
                states = [self._state(p) for p in params]
                beta1, beta2 = group["betas"]
                args = (params, [p.grad for p in params], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                        self._lr(index, group, params[0].device), norm, float(beta1), float(beta2),
                        float(group["eps"]), float(group["weight_decay"]), self.max_grad_norm)
                if self.compiled:
                    try:
                        self._update_for(index, params, args)(*args)
                        continue
                    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported,
                            torch._dynamo.exc.FailOnRecompileLimitHit) as e:
                        # raised while building the graph, before any tensor is touched: the same arithmetic
                        # uncompiled is still this optimizer, only slower
                        log.warning("%s: Inductor could not compile the update (%s); running it uncompiled",
                                    COMPILED_NAME, str(e).splitlines()[0][:300])
                        self.compiled = False
                clipped_adamw_update(*args)

    return {NAME: ClippedFusedAdamW, COMPILED_NAME: CompiledClipAdamW}


def clipped_adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, norm, beta1: float, beta2: float,
                         eps: float, weight_decay: float, max_grad_norm: float) -> None:
    """One AdamW step with the clip coefficient applied to each gradient as it is read, in place on the parameters,
    moments and step counts. torch.optim.AdamW's arithmetic (decoupled decay, bias corrections), written as foreach
    ops so Inductor can fuse each element's work into one read and one write."""
    import torch

    coef = torch.clamp(max_grad_norm / (norm + CLIP_EPS), max=1.0)
    torch._foreach_add_(steps, 1.0)
    # per parameter, as AdamW keeps them: a parameter without a gradient in some step has fewer steps
    bias_correction1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(bias_correction1)
    torch._foreach_add_(bias_correction1, 1.0)
    bias_correction2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_correction2_sqrt)
    torch._foreach_add_(bias_correction2_sqrt, 1.0)
    torch._foreach_sqrt_(bias_correction2_sqrt)
    step_sizes = torch._foreach_reciprocal(bias_correction1)
    torch._foreach_mul_(step_sizes, lr)
    scaled = torch._foreach_mul(grads, coef)
    torch._foreach_lerp_(exp_avgs, scaled, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, scaled, scaled, value=1 - beta2)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_sub_(params, torch._foreach_mul(torch._foreach_div(exp_avgs, denom), step_sizes))


@functools.lru_cache(maxsize=64)
def _compiled_update(signature: tuple):
    """The update compiled on its own copy of the code, one per group signature. Dynamo keeps graphs per code object
    and counts them against its recompile limit (an error under fullgraph=True): one shared function would collect a
    graph for every group of every model a process trains (a sweep, a test session) until the limit. One copy per
    signature holds one graph, and the next optimizer over the same shapes (a repeat, a resumed run) reuses it instead
    of compiling again."""
    import types

    import torch

    code = clipped_adamw_update.__code__.replace()   # equal, not identical: a fresh graph cache
    own = types.FunctionType(code, clipped_adamw_update.__globals__, clipped_adamw_update.__name__)
    return torch.compile(own, fullgraph=True, dynamic=False)


def _update_signature(args: tuple) -> tuple:
    """What a compiled update's graph is specialised on: each tensor's shape, layout, dtype and device, and the
    float hyperparameters (constants in the graph)."""
    import torch

    return tuple(tuple((t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in a) if isinstance(a, list)
                 else (a.shape, a.dtype, a.device) if torch.is_tensor(a) else a
                 for a in args)


def clipped_fused_adamw_class():
    """``adamw_fused_clip``'s class."""
    return _optimizer_classes()[NAME]


def compiled_clip_adamw_class():
    """``adamw_compiled_clip``'s class."""
    return _optimizer_classes()[COMPILED_NAME]


def compiled_step_pays_back(parameters: int, steps: int) -> bool:
    """Whether the compiled step's saving over ``steps`` optimizer steps exceeds its compile time (the H200
    figures above; the saving and the compile both scale with the card, their ratio less)."""
    return parameters * steps * COMPILED_SAVES_S_PER_PARAMETER_STEP >= COMPILE_S


def resolve_optim(settings, *, on_gpu: bool, parameters: int, steps: int) -> str:
    """The optimizer ``training.optim`` runs for a model of ``parameters`` trainable parameters over ``steps``
    optimizer steps: a name as given; ``auto`` is the compiled folded clip where it can run (a GPU, one process or
    DDP, bf16 or fp32, a clip threshold) and repays its compile time within the run, else HF's default (fused AdamW
    after clip_grad_norm_), returned as ``auto``."""
    name = getattr(settings, "optim", "auto")
    if name != "auto":
        return name
    eligible = (on_gpu and settings.precision != "fp16" and float(settings.max_grad_norm or 0) > 0
                and not is_sharded(settings.distributed, settings.gpus * settings.nodes))
    return COMPILED_NAME if eligible and compiled_step_pays_back(parameters, steps) else "auto"


def optimizer_that_ran(settings, trainer) -> str:
    """The optimizer a trainer ran, by its config name: ``training.optim`` as resolved (:func:`resolve_optim`), with
    ``auto`` (HF's default) replaced by the name HF's TrainingArguments chose for it, so a record never says
    ``auto``."""
    if settings.optim != "auto":
        return settings.optim
    name = trainer.args.optim
    return str(getattr(name, "value", name))


def trainer_optimizer(settings) -> tuple[type, dict[str, Any]] | None:
    """``optimizer_cls_and_kwargs`` for the HF Trainer when ``training.optim`` (resolved: :func:`resolve_optim`)
    names one of these optimizers, else None. The Trainer still builds its weight-decay parameter groups and the
    schedule; its own clip is switched off (``training_arguments`` passes max_grad_norm 0 for these optimizers)."""
    name = settings.optim
    if name not in FOLDED_CLIP:
        return None
    return _optimizer_classes()[name], {"lr": float(settings.lr), "betas": (0.9, 0.999), "eps": 1e-8,
                                        "weight_decay": float(settings.weight_decay),
                                        "max_grad_norm": float(settings.max_grad_norm)}
