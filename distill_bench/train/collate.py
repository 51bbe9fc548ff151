"""Micro-batch layout for every student trainer (SFT family and KD): padded or padding-free, bucketed lengths, the
exact count of real input tokens (never padding) for the stage's token accounting, and the loss-bearing positions
(computed here, on the CPU, so the training step needs no host synchronisation to find them)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

REAL_TOKENS = "num_real_tokens"   # batch key: real (non-pad) input tokens of the micro-batch, a Python int
LOSS_TOKENS = "num_loss_tokens"   # batch key: loss-bearing positions (labels[..., 1:] != -100), a Python int
# batch keys: the loss-bearing positions as (row, column) of labels[..., 1:] and their target ids, built on the CPU so
# the trainer never asks the GPU where they are (each such question is a host synchronisation)
LOSS_POSITIONS = ("loss_rows", "loss_cols", "loss_targets")


def loss_positions_in(labels):
    """(rows, cols, targets) of the loss-bearing positions of ``labels[:, 1:]`` (-100 = no loss), row-major: the
    order of the KD cache's teacher rows. On the CPU in the collator; on a device tensor it synchronises the host."""
    shifted = labels[:, 1:]
    mask = shifted != -100
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols, shifted[mask]


MODEL_INPUT_SKIP = frozenset({"labels", "completion_mask", "example_index", "kd_ids", "kd_values", "kd_tail",
                              REAL_TOKENS, LOSS_TOKENS, *LOSS_POSITIONS})


def loss_positions_of(inputs: Mapping[str, Any]):
    """(rows, cols, targets) of the loss-bearing positions of ``labels[:, 1:]`` (row-major): LMCollator's, built on
    the CPU, else found on the device (one host synchronisation). Padding-free rows too: each document's first label
    is -100."""
    if LOSS_POSITIONS[0] in inputs:
        return tuple(inputs[k] for k in LOSS_POSITIONS)
    return loss_positions_in(inputs["labels"])


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The collator's keys the model takes: ids, attention mask or position_ids (padding-free), and the varlen
    boundaries TRL's padding-free collator adds for flash-attention (cu_seq_lens_*, max_length_*, seq_idx)."""
    return {k: v for k, v in batch.items() if k not in MODEL_INPUT_SKIP}


class LMCollator:
    """Padded rows + attention mask, or one padding-free row with position_ids (TRL's own collator lays both out).

    ``pad_to_multiple_of`` rounds the padded width (or the flattened row) up to a multiple, so a run sees a few dozen
    distinct shapes instead of one per step: on an H200 a step whose shapes were seen before ran 1.3-1.7x faster
    than the same step at new shapes (docs/BENCHMARKS.md). Pad positions carry no label; in a padding-free row each
    pad token has position 0, i.e. is a one-token document that attends only to itself.
    """

    def __init__(self, pad_token_id: int, *, padding_free: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.padding_free = bool(padding_free)
        self.pad_to_multiple_of = pad_to_multiple_of

    def rows(self, features: Sequence[Mapping[str, Any]]) -> list[dict[str, list[int]]]:
        """input_ids + labels per example: the dataset's ``labels`` column, else built from ``completion_mask``."""
        out = []
        for f in features:
            ids = list(f["input_ids"])
            if "labels" in f:
                labels = list(f["labels"])
            else:
                mask = list(f["completion_mask"])
                if len(mask) != len(ids):
                    raise ValueError(f"example {f.get('example_index')}: input_ids and completion_mask differ in "
                                     "length")
                labels = [t if m else -100 for t, m in zip(ids, mask)]
            labels[0] = -100   # position 0 is never a target
            out.append({"input_ids": ids, "labels": labels})
        return out

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        rows = self.rows(features)
        layout = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id, padding_free=self.padding_free,
                                                 pad_to_multiple_of=self.pad_to_multiple_of)
        batch = layout(rows)
        batch[REAL_TOKENS] = sum(len(r["input_ids"]) for r in rows)
        positions = loss_positions_in(batch["labels"])
        batch.update(zip(LOSS_POSITIONS, positions))
        batch[LOSS_TOKENS] = int(positions[2].numel())
        return batch
