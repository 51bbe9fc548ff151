"""Shared student trainer: exact token budget, TRL SFTTrainer, checkpoint/resume, KD hooks (no torch at import)."""
from distill_bench.train.budget import build_budgeted_dataset, stream_hash, trained_positions
from distill_bench.train.trainer import (CheckpointMismatchError, TrainingInterrupted, TrainSettings,
                                         train_student)

__all__ = ["TrainSettings", "build_budgeted_dataset", "train_student", "stream_hash", "trained_positions",
           "CheckpointMismatchError", "TrainingInterrupted"]
