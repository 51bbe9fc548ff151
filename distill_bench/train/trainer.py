"""The shared student trainer: TRL `SFTTrainer` on the exact-budget stream, resumable and SIGTERM-safe.

Every pipeline (sft_gt, sft, kd, ...) goes through `train_student`, so the optimizer, schedule, budget and token
accounting are identical; KD only swaps in a trainer subclass (its own `compute_loss`) and a collator.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from distill_bench.atomic import atomic_write_json, short_hash
from distill_bench.defaults import allowed_values, is_sharded, section_defaults, training_conflicts
from distill_bench.energy import StageInterrupted
from distill_bench.train.budget import build_budgeted_dataset
from distill_bench.train.collate import (LOSS_POSITIONS, LOSS_TOKENS, REAL_TOKENS, LMCollator, loss_positions_of,
                                         model_inputs)
from distill_bench.train.head import add_positions_head
from distill_bench.train.optim import FOLDED_CLIP, optimizer_that_ran, resolve_optim, trainer_optimizer
from distill_bench.train.speed import (compile_decoder_layers, resolve_attention, resolve_compile,
                                       resolve_pad_multiple, resolve_padding_free)
from distill_bench.train.step_clock import step_clock_callback
from distill_bench.train.varlen import CONFIG_NAME as VARLEN
from distill_bench.train.varlen import register as register_varlen
from distill_bench.models.build import save_model_dir

log = logging.getLogger(__name__)

FINGERPRINT = "run_fingerprint.json"
COUNTS = "distill_bench_counts.json"
# defaults and allowed values: the schema's `training` section (distill_bench/config/workflow.schema.yaml)
DEFAULTS = section_defaults("training")
PRECISIONS = allowed_values("training", "precision")
SCHEDULERS = allowed_values("training", "lr_scheduler")
# settings that change what is learned; the rest (save_steps, workers...) may change between attempts
_RESULT_KEYS = ("token_budget", "max_length", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
                "lr_scheduler", "precision", "gpus", "max_grad_norm")
DISTRIBUTED = allowed_values("training", "distributed")
# HF optimizer names (auto keeps HF's default), and the AdamWs with the clip folded into their update (train/optim.py)
OPTIMIZERS = allowed_values("training", "optim")
ATTN_IMPLEMENTATIONS = tuple(a for a in allowed_values("training", "attn_implementation") if a is not None)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint in the output dir was written by a run with another config, seed or data."""


STALE_CHECKPOINT_POLICIES = allowed_values("training", "stale_checkpoints")


class TrainingInterrupted(StageInterrupted, RuntimeError):
    """Training stopped on a signal after saving a checkpoint; rerunning resumes from it."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The ``training`` section. Every default is the schema's (what each key means: its descriptions there)."""

    token_budget: int = DEFAULTS["token_budget"]
    max_length: int = DEFAULTS["max_length"]
    batch_size: int = DEFAULTS["batch_size"]
    grad_accum: int = DEFAULTS["grad_accum"]
    lr: float = DEFAULTS["lr"]
    weight_decay: float = DEFAULTS["weight_decay"]
    warmup_ratio: float = DEFAULTS["warmup_ratio"]
    lr_scheduler: str = DEFAULTS["lr_scheduler"]
    precision: str = DEFAULTS["precision"]
    save_steps: int = DEFAULTS["save_steps"]
    gradient_checkpointing: bool = DEFAULTS["gradient_checkpointing"]
    dataloader_workers: int = DEFAULTS["dataloader_workers"]
    gpus: int = DEFAULTS["gpus"]
    max_grad_norm: float = DEFAULTS["max_grad_norm"]
    logging_steps: int | None = DEFAULTS["logging_steps"]
    num_threads: int | None = DEFAULTS["num_threads"]
    padding_free: bool | str = DEFAULTS["padding_free"]            # distill_bench.train.speed
    pad_to_multiple_of: int | str | None = DEFAULTS["pad_to_multiple_of"]
    nodes: int = DEFAULTS["nodes"]                                 # > 1: SLURM multi-node (distill_bench.train.launch)
    distributed: str = DEFAULTS["distributed"]
    attn_implementation: str | None = DEFAULTS["attn_implementation"]   # distill_bench.train.varlen
    torch_compile: bool | str = DEFAULTS["torch_compile"]
    optim: str = DEFAULTS["optim"]                                 # distill_bench.train.optim
    stale_checkpoints: str = DEFAULTS["stale_checkpoints"]

    @classmethod
    def from_dict(cls, section: Mapping[str, Any], **overrides: Any) -> "TrainSettings":
        """Build from the config's ``training`` section (missing keys: the schema's defaults); unknown keys are an
        error naming the key."""
        data = {**dict(section or {}), **overrides}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"training: unknown key(s) {unknown}; known: {sorted(fields)}")
        for key in ("token_budget", "max_length"):
            if data.get(key, DEFAULTS[key]) is None:
                raise ValueError(f"training.{key} must be a positive integer, got None")
        s = cls(**data)
        s.validate()
        return s

    def validate(self) -> None:
        positive = ("token_budget", "max_length", "batch_size", "grad_accum", "save_steps", "gpus", "nodes")
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"training.{key} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"training.lr must be a positive number, got {self.lr!r}")
        if not 0 <= float(self.warmup_ratio) <= 1:
            raise ValueError(f"training.warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"training.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"training.lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.stale_checkpoints not in STALE_CHECKPOINT_POLICIES:
            raise ValueError(f"training.stale_checkpoints must be one of {STALE_CHECKPOINT_POLICIES}, "
                             f"got {self.stale_checkpoints!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"training.optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"training.distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        resolve_compile(self.torch_compile, on_gpu=False)
        conflicts = training_conflicts(dataclasses.asdict(self))
        if conflicts:
            key, why = conflicts[0]
            raise ValueError(f"training.{key} {why}")
        resolve_padding_free(self.padding_free, on_gpu=False, attn_implementation=self.attn_implementation)
        resolve_pad_multiple(self.pad_to_multiple_of, on_gpu=False)
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"training.attn_implementation must be one of {ATTN_IMPLEMENTATIONS} or null, "
                             f"got {self.attn_implementation!r}")

    def result_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RESULT_KEYS}


# --------------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, payload: Any) -> None:
    """Checkpoint-side JSON (sorted keys; a diverged NaN loss is still written, not lost)."""
    atomic_write_json(path, payload, sort_keys=True, allow_nan=True)


def write_train_log(out: Path, summary: Mapping[str, Any]) -> None:
    """``out/train_log.json``: the run summary every trainer (SFT, KD, DPO) leaves beside its model."""
    _write_json(out / "train_log.json", summary)


def run_fingerprint(settings: TrainSettings, seed: int, stream_hash: str, model_config: Mapping[str, Any],
                    trainer_name: str, extra: Mapping[str, Any] | None) -> dict[str, str]:
    """What a checkpoint must match to be resumed: settings, seed, data stream, model config, trainer, extras."""
    cfg = {k: v for k, v in dict(model_config).items()
           if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")}
    return {"settings": short_hash(settings.result_dict()), "seed": str(int(seed)), "stream": stream_hash[:16],
            "model_config": short_hash(cfg), "trainer": trainer_name, "extra": short_hash(dict(extra or {}))}


def check_or_write_fingerprint(ckpt_dir: Path, fp: dict[str, str], has_checkpoint: bool,
                               stale: str = "refuse") -> str | None:
    """Never resume checkpoints of another run; start a fresh run by storing its fingerprint.

    A mismatch is refused (``stale="refuse"``), or, where a config change is the expected cause (the workflow reruns
    a job because its params changed), the old checkpoints are renamed aside and training starts fresh
    (``stale="set_aside"``); returns the directory they were moved to, so the caller can record it.
    """
    path = ckpt_dir / FINGERPRINT
    if has_checkpoint:
        problem = None
        if not path.is_file():
            problem = (f"{ckpt_dir} holds checkpoints but no {FINGERPRINT}; refusing to resume from a run of unknown "
                       f"config")
        else:
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            if diff:
                problem = (f"checkpoint in {ckpt_dir} was written with a different {', '.join(diff)} "
                           f"(stored {{{', '.join(f'{k}: {old.get(k)}' for k in diff)}}}, now "
                           f"{{{', '.join(f'{k}: {fp.get(k)}' for k in diff)}}}); refusing to mix runs")
        if problem is None:
            return None
        if stale != "set_aside":
            raise CheckpointMismatchError(f"{problem} — delete {ckpt_dir} to start over (or set "
                                          "training.stale_checkpoints: set_aside)")
        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(ckpt_dir, aside)
        log.warning("%s; moved them to %s and starting fresh", problem, aside)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, fp)
        return str(aside)
    _write_json(path, fp)
    return None


def _loss_positions_sft_trainer():
    """SFTTrainer whose loss is plain cross-entropy over the loss-bearing positions only.

    TRL 1.16's SFTTrainer projects every position (prompt and padding too) through the LM head and also computes the
    full-vocab entropy and token accuracy each step for its logs; on an H100 the same 1B step with the head applied to
    loss positions only ran 61 % faster (docs/BENCHMARKS.md, "Real trainer path"). Same loss, same normalisation by
    the loss-bearing tokens of the whole accumulated batch (``num_items_in_batch``). Padding-free batches (one
    flattened row with position_ids) take the same path; models whose logits are not plain head(hidden), and
    prediction steps keep TRL's own.
    """
    import torch.nn.functional as F
    from trl import SFTTrainer

    class LossPositionsSFTTrainer(SFTTrainer):
        loss_is_scaled_for_ga = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._head_on_loss_positions = add_positions_head(self.model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self._head_on_loss_positions or "shift_labels" in inputs:
                inputs = {k: v for k, v in inputs.items() if k not in LOSS_POSITIONS}   # TRL passes all to the model
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            rows, cols, targets = loss_positions_of(inputs)
            logits = model(**model_inputs(inputs), kd_rows=rows, kd_cols=cols)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            if num_items_in_batch is None:
                # local mean; the Trainer will not divide by the accumulation steps (loss_is_scaled_for_ga)
                loss = loss / max(targets.numel(), 1) / getattr(self, "current_gradient_accumulation_steps", 1)
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # DDP averages gradients; num_items counts all ranks
            return loss

    return LossPositionsSFTTrainer


def check_even_split(n_examples: int, batch_size: int, world: int) -> None:
    """Refuse, before any training, a stream that does not split into whole batches over the ranks.

    With several ranks accelerate completes an uneven last round by repeating samples from the start, which would
    train tokens beyond the exact budget (and only fail the end-of-run token check after the whole run).
    """
    if world > 1 and n_examples % (batch_size * world):
        raise ValueError(
            f"the budgeted stream has {n_examples} examples, which does not split into whole batches of "
            f"training.batch_size={batch_size} over {world} ranks (accelerate would repeat samples and break the "
            f"exact token budget): change training.token_budget or training.batch_size, or train on one GPU")


class StepBookkeeping:
    """HF Trainer bookkeeping done without extra work on the step's critical path (mixed into every trainer: SFT,
    KD, DPO). At a 1B student's batch 4 the host barely keeps ahead of the GPU, so host time and extra passes over
    the gradients show up in the step time (docs/BENCHMARKS.md)."""

    _db_body_params: int | None = None

    def floating_point_ops(self, inputs):
        """HF's estimate for its ``total_flos`` (6 x input tokens x non-embedding parameters), with the parameter
        count taken once instead of by a walk over every module at each micro-batch (host time, ~1 ms at 1B,
        that a GPU step whose host barely keeps ahead waits for)."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._db_body_params is None:
            self._db_body_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._db_body_params

    def _get_grad_norm(self, model, grad_norm=None):
        """The logged gradient norm without extra passes over the gradients. With its clip off, HF computes it
        through ``clip_grad_norm_(max_norm=inf)``: a norm pass plus a multiply of every gradient by 1. The folded
        clip's optimizer already computes the norm; unsharded gradients need only the norm."""
        if grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm)
        folded = getattr(getattr(self, "optimizer", None), "optimizer", None)   # under accelerate's wrapper
        if folded is not None and hasattr(folded, "clip_norm"):
            return folded.clip_norm()
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return super()._get_grad_norm(model, grad_norm)
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None


def _counting_trainer_class(base: type) -> type:
    """Subclass ``base`` so every micro-batch actually trained adds its exact token counts."""

    class _Counting(StepBookkeeping, base):  # type: ignore[misc, valid-type]
        _db_trained_tokens = 0
        _db_input_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs.get("labels")
            if labels is None:
                raise KeyError("training batch has no 'labels'; a custom collator must keep them (-100 = no loss)")
            loss_tokens = inputs.pop(LOSS_TOKENS, None)   # LMCollator's count, no device read
            if loss_tokens is not None:
                self._db_trained_tokens += int(loss_tokens)
            elif "shift_labels" in inputs:
                self._db_trained_tokens += int(inputs["shift_labels"].ne(-100).sum())
            else:
                self._db_trained_tokens += int(labels[..., 1:].ne(-100).sum())
            real = inputs.pop(REAL_TOKENS, None)   # LMCollator's exact count (a padding-free row may have a pad tail)
            if real is not None:
                self._db_input_tokens += int(real)
            elif "attention_mask" in inputs:
                self._db_input_tokens += int(inputs["attention_mask"].sum())
            else:  # TRL's padding-free batches hold no padding
                self._db_input_tokens += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

        def create_model_card(self, *args, **kwargs):
            """No hub model cards in checkpoints (TRL 1.16's breaks when wandb is merely installed)."""
            return None

    _Counting.__name__ = _Counting.__qualname__ = f"Counting{base.__name__}"
    return _Counting


# optimizer steps of an attempt before the stage JSON's steady-state window opens: the first ones carry compilation
# (per-layer compile, then the recompile at the first new length) and allocator growth
STEADY_AFTER_STEPS = 3


def training_callbacks():
    """(StopOnSignal, SaveCounts) callback classes shared by every trainer (transformers imported lazily)."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """A signal only sets a flag; the next optimizer-step boundary saves a checkpoint and stops. A non-finite
        logged loss stops training at once (no checkpoint: nothing after it is worth its energy)."""

        def __init__(self) -> None:
            self.signum: int | None = None
            self.diverged: dict[str, Any] | None = None

        def handler(self, signum, frame) -> None:  # noqa: ARG002
            log.warning("received signal %s: checkpointing at the end of this optimizer step", signum)
            self.signum = signum

        def on_step_end(self, args, state, control, **kwargs):
            if self.signum is not None:
                control.should_save = True
                control.should_training_stop = True
            elif state.global_step >= state.max_steps:
                control.should_log = True  # the final loss and lr always land in the log
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)) and self.diverged is None:
                self.diverged = {"step": state.global_step, "loss": float(loss),
                                 "grad_norm": (logs or {}).get("grad_norm")}
                control.should_training_stop = True
                control.should_save = False
            return control

    class SaveCounts(TrainerCallback):
        """Exact token counts: streamed to the meter each optimizer step (so a hard-killed attempt's snapshot
        still bills what it trained) and stored next to each checkpoint (so a resumed run continues the tally)."""

        def __init__(self, meter) -> None:
            self.trainer = None
            self.meter = meter
            self.base = (0, 0)       # totals restored from the checkpoint we resumed from
            self.reported = (0, 0)   # this attempt's counts already given to the meter
            self.steps_this_attempt = 0

        def attempt_counts(self) -> tuple[int, int]:
            """This attempt's counts summed over all ranks (a collective under DDP: call it on every rank)."""
            t = self.trainer
            local = (t._db_trained_tokens, t._db_input_tokens)
            import torch.distributed as dist

            if t.args.world_size > 1 and dist.is_available() and dist.is_initialized():
                import torch

                v = torch.tensor(local, dtype=torch.long, device=t.args.device)
                dist.all_reduce(v)
                return int(v[0]), int(v[1])
            return local

        def totals(self) -> tuple[int, int]:
            now = self.attempt_counts()
            return self.base[0] + now[0], self.base[1] + now[1]

        def flush(self) -> None:
            t = self.trainer
            if t is None:
                return
            now = self.attempt_counts()
            if self.meter is None or t.args.process_index != 0:
                return
            if now[0] > self.reported[0]:
                self.meter.add_tokens("trained_tokens", now[0] - self.reported[0])
            if now[1] > self.reported[1]:
                self.meter.add_tokens("input_tokens", now[1] - self.reported[1])
            self.reported = now

        def on_step_end(self, args, state, control, **kwargs):
            self.flush()
            self.steps_this_attempt += 1
            if self.steps_this_attempt == STEADY_AFTER_STEPS and self.meter is not None \
                    and args.process_index == 0 and hasattr(self.meter, "mark_steady_state"):
                self.meter.mark_steady_state()   # compilation and the first batch shapes are behind us
            return control

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            trained, inputs = self.totals()   # every rank: the sum over ranks is a collective
            if ckpt.is_dir() and args.process_index == 0:
                _write_json(ckpt / COUNTS, {"trained_tokens": trained, "input_tokens": inputs,
                                            "global_step": state.global_step})
            return control

    return StopOnSignal, SaveCounts


def one_process_one_gpu(args: Any) -> Any:
    """A stage launched as one process trains on one GPU. Without a distributed launcher HF's Trainer would wrap the
    model in ``nn.DataParallel`` over every visible GPU (TRL refuses that); several GPUs go through the torchrun
    launch (``training.gpus``). The meter still sees every visible GPU, so lease or set ``CUDA_VISIBLE_DEVICES``."""
    if args.n_gpu > 1 and args.world_size == 1:
        log.warning("%d GPUs visible to a one-process training: it uses cuda:0 only (training.gpus launches several; "
                    "the workflow's lease or CUDA_VISIBLE_DEVICES keeps the others out of the stage's energy)",
                    args.n_gpu)
        args._n_gpu = 1
    return args


def with_resolved_optim(settings: TrainSettings, model, max_steps: int, use_cpu: bool) -> TrainSettings:
    """``settings`` with ``optim: auto`` resolved for this model and run length (train/optim.py): what the trainer
    builds, and what the stage JSON and train log record."""
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dataclasses.replace(settings, optim=resolve_optim(settings, on_gpu=not use_cpu, parameters=parameters,
                                                             steps=max_steps))


def training_arguments(settings: TrainSettings, ckpt_dir: Path, max_steps: int, seed: int,
                       use_cpu: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` keywords every trainer shares (SFT, KD, DPO): optimizer, schedule over the real
    ``max_steps``, precision, checkpointing, logging, data loading and seeds."""
    return dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=float(settings.lr),
        weight_decay=float(settings.weight_decay),
        # exact integer step count: HF reads a float >= 1 as steps, so a ratio of 1.0 must not reach it as a float
        warmup_steps=int(math.ceil(float(settings.warmup_ratio) * max_steps)),
        lr_scheduler_type=settings.lr_scheduler,
        # the folded-clip optimizers clip inside their step (train/optim.py), so HF's own clip is off
        max_grad_norm=0.0 if settings.optim in FOLDED_CLIP else float(settings.max_grad_norm),
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        activation_checkpointing=bool(settings.gradient_checkpointing),  # TRL defaults it on
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=settings.logging_steps or max(1, min(50, max_steps // 50)),
        logging_first_step=True,
        # no per-step host synchronisation: HF's NaN/inf filter reads every step's loss on the host (a NaN loss is
        # logged as NaN instead of being smoothed over), and batches are copied to the GPU without blocking
        logging_nan_inf_filter=False,
        accelerator_config=None if use_cpu else {"non_blocking": True},
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        dataloader_num_workers=0 if use_cpu else settings.dataloader_workers,
        dataloader_pin_memory=not use_cpu,
        seed=int(seed),
        data_seed=int(seed),
        eval_strategy="no",
        save_only_model=False,                 # optimizer + scheduler + RNG needed to resume exactly
        **({} if settings.optim == "auto" or settings.optim in FOLDED_CLIP else {"optim": settings.optim}),
    )


def _sft_config(settings: TrainSettings, ckpt_dir: Path, max_steps: int, seed: int, use_cpu: bool,
                compile_mode: str = "none"):
    from trl import SFTConfig

    extra: dict[str, Any] = {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and settings.distributed == "fsdp":
        extra.update(fsdp="full_shard auto_wrap", fsdp_config={"use_orig_params": True})
    if compile_mode == "model":
        extra.update(torch_compile=True)
    if world > 1:
        extra.update(ddp_find_unused_parameters=False)   # every parameter gets a gradient: skip the graph walk
    return one_process_one_gpu(SFTConfig(
        **extra,
        **training_arguments(settings, ckpt_dir, max_steps, seed, use_cpu),
        max_steps=max_steps,
        dataloader_persistent_workers=bool(settings.dataloader_workers) and not use_cpu,
        remove_unused_columns=False,          # KD collators read extra columns (example_index, ...)
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenised, labels built, never truncated again
        max_length=None,
        packing=False,
        padding_free=False,                   # our collator (LMCollator) lays out padded or padding-free batches
        train_sampling_strategy="sequential",  # the stream order *is* the budget order
    ))


def _with_labels(stream: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ex in stream:
        item = dict(ex)
        item["labels"] = [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"])]
        out.append(item)
    return out


def _loss_curve(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]


def _lr_curve(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["learning_rate"])) for e in log_history
            if "learning_rate" in e and "step" in e]


class TrainingDiverged(FloatingPointError):
    """The logged loss became NaN or infinite: the run stopped at that step and saved no model."""


# Ctrl-C is an interruption like a scheduler's SIGTERM: both save a checkpoint so a rerun resumes, not restarts
CHECKPOINT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def redeliver_signal(signum: int) -> None:
    """Hand the signal to whoever owned it before training (e.g. the energy meter), then stop this stage."""
    signal.raise_signal(signum)
    raise TrainingInterrupted(f"training interrupted by signal {signum}; checkpoint saved, rerun to resume")


def resume_and_train(trainer, stopper, counter, last: str | None, max_steps: int, what: str = "") -> tuple[Any, int]:
    """Continue the exact token tally stored beside checkpoint ``last`` (if any), then train with SIGTERM/SIGINT/SIGUSR1
    turned into checkpoint-and-stop (the previous handlers restored afterwards). Returns (train result, the step
    resumed from)."""
    start_step = 0
    if last is not None:
        counts_file = Path(last) / COUNTS
        if not counts_file.is_file():
            raise CheckpointMismatchError(f"checkpoint {last} has no {COUNTS}; cannot continue the exact token tally")
        c = json.loads(counts_file.read_text())
        counter.base = (int(c["trained_tokens"]), int(c["input_tokens"]))
        start_step = int(c["global_step"])
        log.info("resuming %sfrom %s (step %d of %d)", what, last, start_step, max_steps)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for s in CHECKPOINT_SIGNALS:
            previous[s] = signal.signal(s, stopper.handler)
    try:
        result = trainer.train(resume_from_checkpoint=last)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return result, start_step


def stop_if_interrupted(trainer, stopper, counter, summary: dict[str, Any], max_steps: int, out: Path,
                        report: Callable[[Mapping[str, Any], bool], None]) -> None:
    """After a signal stopped training early: keep the partial summary, bill this attempt's tokens, report, and
    re-deliver the signal (raises TrainingInterrupted). No-op when training ran to the end."""
    if stopper.signum is None or trainer.state.global_step >= max_steps:
        return
    summary["interrupted_by_signal"] = stopper.signum
    if trainer.args.process_index == 0:
        write_train_log(out, summary)
    counter.flush()
    report(summary, False)
    redeliver_signal(stopper.signum)


# --------------------------------------------------------------------------------------------- the skeleton


@dataclasses.dataclass
class TrainingJob:
    """What a trainer (SFT/KD's ``train_student``, DPO's ``train_dpo``) plugs into :func:`run_training`.

    The skeleton owns what every trainer must do the same way: the run fingerprint guarding the checkpoints, resume
    with the exact token tally stored beside a checkpoint, SIGTERM/SIGUSR1 -> checkpoint and re-deliver, the check
    that the trained tokens are exactly the ones declared, the final model and ``train_log.json`` (rank 0), and the
    stage metrics, once."""

    settings: TrainSettings
    seed: int
    out: Path
    tokenizer: Any
    model_config: Mapping[str, Any]   # before any attention/compile change, so fingerprints stay comparable
    stream_hash: str
    trainer_name: str
    fingerprint_extra: Mapping[str, Any] | None
    max_steps: int
    expected_tokens: int              # the exact loss-bearing tokens the run must train
    expected_what: str                # how the error names them ("the budget ...", "declared (...)")
    build_trainer: Callable[[list], Any]       # callbacks -> a counting HF Trainer writing to checkpoints_dir(out)
    summarize: Callable[[Any, list], dict[str, Any]]   # (trainer, log history) -> the trainer's own summary fields
    report_keys: Sequence[str]        # summary keys recorded as stage metrics
    meter: Any = None
    what: str = ""                    # log prefix ("DPO ")
    keep_checkpoints: bool = False
    before_save: Callable[[], None] | None = None


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def prepare_process(settings: TrainSettings) -> None:
    """Quiet progress bars (they only spam the stage logs) and apply ``training.num_threads``."""
    import torch
    from datasets.utils.logging import disable_progress_bar as quiet_datasets
    from transformers.utils.logging import disable_progress_bar as quiet_transformers

    quiet_datasets()
    quiet_transformers()
    if settings.num_threads:
        torch.set_num_threads(int(settings.num_threads))


def run_training(job: TrainingJob) -> dict[str, Any]:
    """fingerprint -> resume -> train (signals checkpoint) -> summary -> interrupted? -> token check -> save ->
    metrics. Returns the summary (also ``out/train_log.json``)."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = checkpoints_dir(job.out)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fp = run_fingerprint(job.settings, job.seed, job.stream_hash, job.model_config, job.trainer_name,
                         job.fingerprint_extra)
    last = get_last_checkpoint(str(ckpt_dir))
    set_aside = check_or_write_fingerprint(ckpt_dir, fp, last is not None, job.settings.stale_checkpoints)
    if set_aside:
        last = None
        if job.meter is not None:
            job.meter.record("stale_checkpoints_set_aside", set_aside)
    StopOnSignal, SaveCounts = training_callbacks()
    stopper, counter = StopOnSignal(), SaveCounts(job.meter)
    if job.meter is not None:
        job.meter.set_primary_tokens("trained_tokens")
    clock = step_clock_callback(counter, job.max_steps)
    trainer = job.build_trainer([stopper, counter, clock])
    counter.trainer = trainer
    result, start_step = resume_and_train(trainer, stopper, counter, last, job.max_steps, what=job.what)

    trained, input_tokens = counter.totals()   # summed over ranks once, here
    if stopper.diverged is not None:
        counter.flush()   # the tokens trained up to the divergence are billed
        d = stopper.diverged
        raise TrainingDiverged(f"{job.what}training diverged: loss {d['loss']} at optimizer step {d['step']} of "
                               f"{job.max_steps} (grad_norm {d['grad_norm']}); stopped there, no model saved")
    summary: dict[str, Any] = {
        "trained_tokens": trained,
        "input_tokens": input_tokens,
        "max_steps": job.max_steps,
        "steps": int(trainer.state.global_step),
        "resumed_from_step": start_step,
        "trained_tokens_this_attempt": trained - counter.base[0],
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "settings": dataclasses.asdict(job.settings),
        "seed": int(job.seed),
        "trainer": job.trainer_name,
        "fingerprint": fp,
        "speed": clock.speed,
        **job.summarize(trainer, trainer.state.log_history),
    }
    report = functools.partial(_report, job.meter, job.report_keys)
    stop_if_interrupted(trainer, stopper, counter, summary, job.max_steps, job.out, report)

    if summary["trained_tokens"] != job.expected_tokens:
        raise RuntimeError(f"{job.what}trained {summary['trained_tokens']} tokens but {job.expected_what} is "
                           f"{job.expected_tokens}: the batches consumed do not match the stream")
    if job.before_save is not None:
        job.before_save()
    save_final_model(trainer, job.out / "final", job.tokenizer)
    if trainer.args.process_index == 0:
        write_train_log(job.out, summary)
        if not job.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    counter.flush()
    report(summary, True)
    return summary


# --------------------------------------------------------------------------------------------- SFT and KD


SFT_REPORT_KEYS = ("final_loss", "mean_loss", "steps", "max_steps", "lr_last_step", "lr_end", "resumed_from_step",
                   "trained_tokens_this_attempt", "loss_curve", "padding_free", "pad_to_multiple_of", "torch_compile",
                   "attn_implementation", "token_budget", "budget_epochs", "stream_examples", "data_wait_fraction",
                   "kd_loss_compiled", "optim",
                   "speed")


def train_student(*, model, tokenizer, examples: Sequence[dict[str, Any]], settings: TrainSettings, seed: int,
                  output_dir: str | os.PathLike, trainer_cls: type | None = None,
                  trainer_kwargs: Mapping[str, Any] | None = None, collator=None, meter=None,
                  fingerprint_extra: Mapping[str, Any] | None = None, keep_checkpoints: bool = False
                  ) -> dict[str, Any]:
    """Train ``model`` on the exact-budget stream of ``examples`` and save ``output_dir/final`` (HF format).

    ``examples`` are dicts with ``input_ids`` and ``completion_mask`` (from ``encode_prompt_response``) plus any extra
    fields a custom collator needs. Resumes from ``output_dir/checkpoints`` when a checkpoint of the same config
    exists; on SIGTERM/SIGINT/SIGUSR1 saves a checkpoint and re-delivers the signal (then raises TrainingInterrupted).
    Returns a summary dict (also written to ``output_dir/train_log.json``).
    """
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    prepare_process(settings)
    out = Path(output_dir)
    stream, budget_info = build_budgeted_dataset(examples, settings.token_budget, seed)
    too_long = max(len(ex["input_ids"]) for ex in stream)
    if too_long > settings.max_length:
        raise ValueError(f"an example has {too_long} tokens > training.max_length={settings.max_length}; "
                         "filter with encode_prompt_response(max_length=...) first")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_even_split(len(stream), settings.batch_size, world)
    max_steps = math.ceil(len(stream) / (settings.batch_size * settings.grad_accum * world))

    base_cls = trainer_cls or _loss_positions_sft_trainer()
    if not issubclass(base_cls, SFTTrainer):
        raise TypeError(f"trainer_cls must subclass trl.SFTTrainer, got {base_cls!r}")
    model_config = model.config.to_dict()
    use_cpu = not torch.cuda.is_available()
    settings = with_resolved_optim(settings, model, max_steps, use_cpu)
    own_attn = model.config._attn_implementation
    attn = settings.attn_implementation if settings.attn_implementation != "auto" else None
    padding_free = resolve_padding_free(settings.padding_free, on_gpu=not use_cpu,
                                        attn_implementation=attn or own_attn)
    multiple = resolve_pad_multiple(settings.pad_to_multiple_of, on_gpu=not use_cpu)
    if collator is None:
        collator = LMCollator(tokenizer.pad_token_id)
    if isinstance(collator, LMCollator):
        collator.padding_free, collator.pad_to_multiple_of = padding_free, multiple
    elif padding_free or multiple:
        if settings.padding_free is True or isinstance(settings.pad_to_multiple_of, int):
            raise ValueError(f"training.padding_free / pad_to_multiple_of: the custom collator "
                             f"{type(collator).__name__} is not an LMCollator and lays batches out itself")
        padding_free, multiple = False, None
    # auto: varlen, +42 % tok/s over SDPA's masked padding-free rows on an H100 (docs/BENCHMARKS.md)
    attn = resolve_attention(settings.attn_implementation, model.config, padding_free=padding_free,
                             on_gpu=not use_cpu)
    if attn == VARLEN:
        if not padding_free:
            raise ValueError("training.attn_implementation=varlen needs padding-free batches: training.padding_free "
                             "true (or auto on a GPU) and the trainer's own LMCollator")
        model.set_attn_implementation(register_varlen())
    elif attn:
        model.set_attn_implementation(attn)
    compile_mode = resolve_compile(settings.torch_compile, on_gpu=not use_cpu,
                                   sharded=is_sharded(settings.distributed, world))
    if compile_mode == "layers":
        log.info("compiled %d decoder layers", compile_decoder_layers(model))
    args = _sft_config(settings, checkpoints_dir(out), max_steps, seed, use_cpu, compile_mode)

    def build_trainer(callbacks: list) -> Any:
        kwargs = dict(trainer_kwargs or {})
        optimizer = trainer_optimizer(settings)   # None: HF builds the optimizer training.optim names
        if optimizer is not None:
            kwargs.setdefault("optimizer_cls_and_kwargs", optimizer)
        return _counting_trainer_class(base_cls)(
            model=model, args=args, train_dataset=Dataset.from_list(_with_labels(stream)),
            processing_class=tokenizer, data_collator=collator,
            callbacks=list(kwargs.pop("callbacks", []) or []) + callbacks, **kwargs)

    def summarize(trainer, history: list) -> dict[str, Any]:
        curve = _loss_curve(history)
        lrs = _lr_curve(history)
        own = {
            "token_budget": settings.token_budget,
            "loss_curve": curve,
            "lr_curve": lrs,
            "final_loss": curve[-1][1] if curve else None,
            "mean_loss": mean_loss(curve),
            "budget": dict(budget_info),
            "budget_epochs": budget_info["epochs"],
            "stream_examples": budget_info["stream_examples"],
            "padding_free": padding_free,
            "pad_to_multiple_of": multiple,
            "torch_compile": compile_mode,
            "attn_implementation": attn or own_attn,
            "optim": optimizer_that_ran(settings, trainer),
            "lr_last_step": lrs[-1][1] if lrs else None,
            "lr_end": float(trainer.lr_scheduler.get_last_lr()[0]) if trainer.lr_scheduler is not None else None,
        }
        if hasattr(trainer, "data_wait_fraction"):  # KD: time waiting for the cache reads, as a share of step time
            own["data_wait_fraction"] = trainer.data_wait_fraction()
        if hasattr(trainer, "kd_loss_compiled"):    # KD: the loss's terms compiled with the layers
            own["kd_loss_compiled"] = trainer.kd_loss_compiled
        return own

    def restore_attention() -> None:
        if attn == VARLEN:
            model.set_attn_implementation(own_attn)   # the saved model must load without distill_bench's kernel

    return run_training(TrainingJob(
        settings=settings, seed=seed, out=out, tokenizer=tokenizer, model_config=model_config,
        stream_hash=budget_info["stream_hash"], trainer_name=base_cls.__name__, fingerprint_extra=fingerprint_extra,
        max_steps=max_steps, expected_tokens=settings.token_budget,
        expected_what="the budget (loss-bearing tokens)",
        build_trainer=build_trainer, summarize=summarize, report_keys=SFT_REPORT_KEYS, meter=meter,
        keep_checkpoints=keep_checkpoints, before_save=restore_attention))


def save_final_model(trainer, out_dir: Path, tokenizer) -> None:
    """Rank 0 writes the final model. Under FSDP every rank first joins the gather of the full weights (a
    collective): rank 0 saving its sharded module alone would hang on the gather or write only its shard."""
    state = None
    if getattr(trainer, "is_fsdp_enabled", False):
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.args.process_index == 0:
        save_model_dir(trainer.model, out_dir, tokenizer, state_dict=state)


def mean_loss(curve: list[tuple[int, float]]) -> float | None:
    """Step-weighted mean of the logged (interval-averaged) losses."""
    if not curve:
        return None
    total, prev, weighted = 0, 0, 0.0
    for step, loss in curve:
        w = max(step - prev, 1)
        weighted += w * loss
        total += w
        prev = step
    return weighted / total


def _report(meter, keys: Sequence[str], summary: Mapping[str, Any], final: bool) -> None:
    """Stage metrics. Token counts reach the meter per attempt (SaveCounts), since the meter sums attempts."""
    if meter is None:
        return
    meter.set_primary_tokens("trained_tokens")
    for key in keys:
        if key in summary:
            meter.record(key, summary[key])
    meter.record("trained_tokens_total", int(summary["trained_tokens"]))
    meter.record("training_completed", bool(final))
