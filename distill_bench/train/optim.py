"""AdamW with the gradient-norm clip folded into its fused kernel (``training.optim: adamw_fused_clip``).

Why: at a 1B student's batch 4 the optimizer step is a fixed ~17 ms, 17 % of the step (docs/BENCHMARKS.md, third
round). HF's step is clip_grad_norm_ (read every gradient for the norm, then read and write every gradient again to
scale it) followed by fused AdamW (read parameter, gradient and both moments, write three). The scaling pass is a
full extra read + write of the fp32 gradients. Fused AdamW already divides gradients by a ``grad_scale`` tensor
inside its kernel (the hook AMP's GradScaler uses), so the clip coefficient can travel there instead: same update,
one pass over the gradients fewer, no host synchronisation (the coefficient stays a device tensor).

The Trainer logs a gradient norm every step; with its own clip off it would compute one itself, through
``clip_grad_norm_(max_norm=inf)``: a second norm pass and a multiply of every gradient by 1. The trainers ask this
optimizer for its norm instead (``clip_norm``, computed once per step and reused by ``step``).

Single process or DDP only (DDP's gradients are identical on every rank, so the local norm is the global one); with
FSDP each rank holds a shard and the norm would need an all-reduce, which this does not do.
"""
from __future__ import annotations

from typing import Any

NAME = "adamw_fused_clip"


def clipped_fused_adamw_class():
    """The optimizer class (built on first use: importing this module does not import torch)."""
    import torch

    class ClippedFusedAdamW(torch.optim.AdamW):
        def __init__(self, params, *, max_grad_norm: float, **kwargs: Any):
            if not max_grad_norm or max_grad_norm <= 0:
                raise ValueError(f"{NAME} needs a positive training.max_grad_norm, got {max_grad_norm!r}")
            kwargs["fused"] = True
            super().__init__(params, **kwargs)
            self.max_grad_norm = float(max_grad_norm)
            self.last_grad_norm: torch.Tensor | None = None
            self.grad_scale = None

        @torch.no_grad()
        def clip_norm(self) -> torch.Tensor | None:
            """This step's gradient norm before clipping (a device tensor; None without gradients). Computed once:
            the coming ``step`` clips with it."""
            if self.grad_scale is None:
                grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
                if not grads:
                    return None
                # the same norm and coefficient as torch.nn.utils.clip_grad_norm_ (error_if_nonfinite=False)
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
                self.last_grad_norm = norm
                # fused AdamW divides each gradient by grad_scale: 1 / min(1, max_norm / (norm + 1e-6))
                self.grad_scale = torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0).float()
            return self.last_grad_norm

        @torch.no_grad()
        def step(self, closure=None):
            self.clip_norm()
            try:
                return super().step(closure)
            finally:
                self.grad_scale = None

    return ClippedFusedAdamW


def trainer_optimizer(settings) -> tuple[type, dict[str, Any]] | None:
    """``optimizer_cls_and_kwargs`` for the HF Trainer when ``training.optim`` asks for this optimizer, else None.
    The Trainer still builds its weight-decay parameter groups and the schedule; its own clip is switched off
    (``training_arguments`` passes max_grad_norm 0 for this optimizer)."""
    if getattr(settings, "optim", "auto") != NAME:
        return None
    return clipped_fused_adamw_class(), {"lr": float(settings.lr), "betas": (0.9, 0.999), "eps": 1e-8,
                                         "weight_decay": float(settings.weight_decay),
                                         "max_grad_norm": float(settings.max_grad_norm)}
