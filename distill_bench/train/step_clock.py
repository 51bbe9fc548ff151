"""Steady-state speed of one training run, recorded in the stage JSON (``metrics.speed``).

Why: a stage's duration also holds model loading, compilation and the final save, so tokens over the stage's
duration understate the step rate that MFU, a forecast's calibration and a comparison between GPU layouts need.
The clock marks the end of a warm-up step and the end of training, each after one device synchronisation (two per
run, none per step), and reads the exact token tally there; peak device memory is the maximum over ranks.
"""
from __future__ import annotations

import time
from typing import Any


def default_warmup(max_steps: int) -> int:
    """Steps left out of the window: compilation and first-shape costs land in the first few (at most 10)."""
    return max(1, min(10, max_steps // 4))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _max_over_ranks(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    return float(value)


def step_clock_callback(counter, max_steps: int):
    """A TrainerCallback timing the steps after :func:`default_warmup`; ``counter`` is the trainer's SaveCounts
    (its ``attempt_counts`` is a collective, called on every rank at the same two steps)."""
    from transformers import TrainerCallback

    warmup = default_warmup(max_steps)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.mark: tuple[int, float, int, int] | None = None   # (step, time, trained, input) after warm-up
            self.speed: dict[str, Any] | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup and self.mark is None and counter.trainer is not None:
                _sync()
                trained, inputs = counter.attempt_counts()
                self.mark = (state.global_step, time.perf_counter(), trained, inputs)
            return control

        def on_train_end(self, args, state, control, **kwargs):
            import torch

            if counter.trainer is None:
                return control
            _sync()
            now = time.perf_counter()
            trained, inputs = counter.attempt_counts()
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            peak = _max_over_ranks(peak, args.device)
            wrapped = getattr(counter.trainer, "model_wrapped", None)
            speed: dict[str, Any] = {
                "warmup_steps": warmup, "world_size": int(args.world_size),
                "wrapper": type(wrapped).__name__ if wrapped is not None else None,
                "peak_memory_gib_max_rank": round(peak, 3) if torch.cuda.is_available() else None,
            }
            if self.mark is not None and state.global_step > self.mark[0]:
                step0, t0, trained0, inputs0 = self.mark
                window = now - t0
                speed.update({
                    "window_steps": int(state.global_step - step0), "window_s": window,
                    "step_s": window / (state.global_step - step0),
                    "input_tokens_per_s": (inputs - inputs0) / window,
                    "trained_tokens_per_s": (trained - trained0) / window,
                })
            else:
                speed["window_steps"] = 0   # too short a run for a steady-state window
            self.speed = speed
            return control

    return StepClock()
