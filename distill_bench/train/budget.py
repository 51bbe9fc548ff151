"""The exact token budget: a deterministic stream of examples whose loss-bearing tokens sum to the budget.

Every pipeline trains on such a stream, so "equal budget" means equal loss-bearing tokens, not equal steps or
examples. Causal-LM loss shifts labels by one, so a completion token at position 0 could never be trained; the
completion always follows a prompt, and we assert that instead of silently miscounting.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence


def trained_positions(mask: Sequence[int]) -> int:
    """Loss-bearing tokens of one example after the causal shift (position 0 is never a target)."""
    return int(sum(mask[1:]))


def _check(examples: Sequence[dict[str, Any]]) -> list[int]:
    counts = []
    for i, ex in enumerate(examples):
        for key in ("input_ids", "completion_mask"):
            if key not in ex:
                raise ValueError(f"example {i}: missing key {key!r}")
        ids, mask = ex["input_ids"], ex["completion_mask"]
        if len(ids) != len(mask):
            raise ValueError(f"example {i}: input_ids ({len(ids)}) and completion_mask ({len(mask)}) differ in length")
        if len(mask) and mask[0]:
            raise ValueError(f"example {i}: completion_mask[0] is 1, but position 0 is never a training target "
                             "(the completion must follow a prompt)")
        n = trained_positions(mask)
        if n <= 0:
            raise ValueError(f"example {i}: no completion tokens")
        counts.append(n)
    return counts


def stream_hash(stream: Sequence[dict[str, Any]]) -> str:
    """Content hash of a stream (ids and masks in order): identifies the exact data a checkpoint was trained on."""
    h = hashlib.sha256()
    for ex in stream:
        h.update(len(ex["input_ids"]).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in ex["input_ids"]))
        h.update(bytes(int(m) for m in ex["completion_mask"]))
    return h.hexdigest()


def build_budgeted_dataset(examples: Sequence[dict[str, Any]], token_budget: int, seed: int
                           ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Shuffled epochs of ``examples`` (a fresh shuffle per epoch), cut so completion tokens sum to ``token_budget``.

    The last example is truncated right after the token that exhausts the budget. Each stream item is a copy of its
    source example (extra fields such as ``example_index`` kept) plus ``source_index`` and ``epoch``.
    """
    token_budget = int(token_budget)
    if token_budget <= 0:
        raise ValueError(f"training.token_budget must be positive, got {token_budget}")
    if not examples:
        raise ValueError("build_budgeted_dataset: no examples (empty dataset after filtering?)")
    counts = _check(examples)
    stream: list[dict[str, Any]] = []
    remaining, epoch = token_budget, 0
    truncated = False
    while remaining > 0:
        order = list(range(len(examples)))
        random.Random(f"distill-bench-budget:{int(seed)}:{epoch}").shuffle(order)
        for idx in order:
            ex = examples[idx]
            item = dict(ex)
            item["source_index"] = idx
            item["epoch"] = epoch
            n = counts[idx]
            if n > remaining:
                # cut right after the remaining-th loss-bearing position (counted from position 1)
                mask = ex["completion_mask"]
                seen, cut = 0, len(mask)
                for pos in range(1, len(mask)):
                    seen += int(mask[pos])
                    if seen == remaining:
                        cut = pos + 1
                        break
                item["input_ids"] = list(ex["input_ids"][:cut])
                item["completion_mask"] = list(mask[:cut])
                n, truncated = remaining, True
            else:
                item["input_ids"] = list(ex["input_ids"])
                item["completion_mask"] = list(ex["completion_mask"])
            stream.append(item)
            remaining -= n
            if remaining == 0:
                break
        epoch += 1
    total_completion = sum(counts)
    info = {
        "token_budget": token_budget,
        "stream_examples": len(stream),
        "dataset_examples": len(examples),
        "dataset_completion_tokens": total_completion,
        "epochs": token_budget / total_completion,
        "epochs_started": epoch,
        "last_example_truncated": truncated,
        "stream_input_tokens": sum(len(ex["input_ids"]) for ex in stream),
        "stream_hash": stream_hash(stream),
    }
    return stream, info
