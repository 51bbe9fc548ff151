"""The `train_student` workflow stage: one student, one pipeline, the shared budget and trainer.

Resolving this stage imports no torch (the stage adapter resolves it before the meter opens): the KD trainer and
DPO's stage entry, which import torch, are imported where those pipelines use them, inside the meter, so that time
is metered rather than left as harness overhead.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from distill_bench.models.build import check_model_tokenizer, load_model
from distill_bench.models.stage import encode_split, load_split
from distill_bench.models.tokenizer import load_tokenizer
from distill_bench.train.launch import launch_train, wants_launch
from distill_bench.train.trainer import TrainSettings
from distill_bench.train.trainer import train_student as run_trainer

log = logging.getLogger(__name__)

PLAIN_PIPELINES = ("sft_gt", "sft", "continued")  # SFT on a dataset dir's prompt/response columns


def train_student(*, meter, pipeline: str, dataset: str, tokenizer: str, init_model: str, out_dir: str,
                  training: Mapping[str, Any], seed: int, kd_cache: str | None = None,
                  kd_tail: str | None = None, kd: Mapping[str, Any] | None = None, method: str | None = None,
                  dpo: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Encode the dataset's train split, train ``init_model`` on the exact budget, write ``out_dir/final``.

    ``pipeline`` is what the comparison table shows; ``method`` (default: the pipeline) is the training machinery,
    which differs for self-distillation (kd or sft from an earlier student) and continued training (sft_gt).
    """
    pipeline = method or pipeline
    if pipeline == "dpo":   # DPO's own stage entry (same launch, same trainer skeleton)
        from distill_bench.dpo.stage import train_preferences  # imports torch: deferred on purpose (docstring)

        return train_preferences(meter=meter, dataset=dataset, tokenizer=tokenizer, init_model=init_model,
                                 out_dir=out_dir, dpo=dict(dpo or {}), training=training, seed=seed)
    if pipeline not in PLAIN_PIPELINES and pipeline != "kd":
        raise ValueError(f"train_student: pipeline {pipeline!r} is not trained by this stage "
                         f"(supported: {', '.join(PLAIN_PIPELINES + ('kd',))})")
    settings = TrainSettings.from_dict(training)
    if wants_launch(settings):  # gpus/nodes > 1: this process keeps the meter, torchrun workers train
        return launch_train(meter=meter, settings=settings, target=f"{__name__}:train_student", stage_kwargs=dict(
            pipeline=pipeline, dataset=dataset, tokenizer=tokenizer, init_model=init_model, out_dir=out_dir,
            training=dict(training), seed=seed, kd_cache=kd_cache, kd_tail=kd_tail,
            kd=dict(kd) if kd is not None else None))
    tok = load_tokenizer(tokenizer)
    h = check_model_tokenizer(init_model, tokenizer, tok)  # before any expensive work
    ds = load_split(dataset, "train")
    examples, dropped = encode_split(tok, ds, settings.max_length)
    meter.record("dataset_examples", len(ds))
    meter.record("dropped_over_max_length", dropped)
    meter.record("vocab_hash", h)
    if not examples:
        raise ValueError(f"dataset {dataset!r}: no example fits training.max_length={settings.max_length}")

    trainer_cls = collator = None
    trainer_kwargs: dict[str, Any] = {}
    fingerprint_extra: dict[str, Any] = {"pipeline": pipeline}
    if pipeline == "kd":
        if not kd_cache:
            raise ValueError("pipeline 'kd' needs kd_cache (the teacher logit cache dir)")
        from distill_bench.kd.trainer import kd_trainer_parts  # imports torch: deferred on purpose (docstring)

        trainer_cls, collator, extra = kd_trainer_parts(cache_dir=kd_cache, kd=dict(kd or {}), tokenizer=tok,
                                                        examples=examples, tail_dirs=[kd_tail] if kd_tail else [])
        for key, value in dict(extra or {}).items():  # KD facts (cache k, tau, alpha...) for the stage JSON
            meter.record(key, value)
        fingerprint_extra.update({"kd": dict(kd or {}), "kd_cache": str(kd_cache), "kd_tail": kd_tail})

    model = load_model(init_model)
    return run_trainer(model=model, tokenizer=tok, examples=examples, settings=settings, seed=seed,
                       output_dir=out_dir, trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs,
                       collator=collator, meter=meter, fingerprint_extra=fingerprint_extra)
