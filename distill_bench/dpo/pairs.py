"""Preference pairs: best-vs-worst pairs from judged candidates (``build_pairs``, pure), reading a pairs directory
and encoding pairs to ids (``encode_pairs``) -- shared by the judge, the reference pass and DPO training, so none of
them imports another's stage.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from distill_bench.defaults import section_defaults
from distill_bench.models.tokenizer import encode_prompt, encode_prompt_response

REFERENCE_INFO = "reference_info.json"   # beside precomputed reference log-probs: what they were computed for
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")

REASONS = ("pairs", "dropped_all_equal", "dropped_below_margin", "dropped_single_candidate",
           "dropped_malformed_judge_output", "prompts_without_candidates")


def build_pairs(scored_rows: Iterable[Mapping[str, Any]], margin: float
                ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per prompt: the best candidate vs the worst one, kept only when ``best - worst > margin`` (strictly).

    ``scored_rows``: dicts with ``prompt_id``, ``prompt``, ``response``, ``score`` (float, or None for a malformed
    judge output) and optionally ``source``/``sample_index``. Prompts are emitted in first-seen order; among equal
    scores the earliest row wins (deterministic). Counts: ``pairs``; prompts dropped because every valid score is
    equal (``dropped_all_equal``), the spread is within the margin (``dropped_below_margin``), only one candidate
    was valid (``dropped_single_candidate``) or none was (``prompts_without_candidates``); and candidates whose
    judge output was malformed (``dropped_malformed_judge_output``).
    """
    margin = float(margin)
    if math.isnan(margin) or margin < 0:
        raise ValueError(f"margin must be a number >= 0, got {margin!r}")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in scored_rows:
        groups.setdefault(str(row["prompt_id"]), []).append(row)
    counts = {k: 0 for k in REASONS}
    pairs: list[dict[str, Any]] = []
    for prompt_id, rows in groups.items():
        valid = []
        for r in rows:
            s = r.get("score")
            if s is None or (isinstance(s, float) and math.isnan(s)):
                counts["dropped_malformed_judge_output"] += 1
            else:
                valid.append(r)
        if not valid:
            counts["prompts_without_candidates"] += 1
            continue
        if len(valid) == 1:
            counts["dropped_single_candidate"] += 1
            continue
        best = max(valid, key=lambda r: float(r["score"]))     # max/min return the first of equal scores
        worst = min(valid, key=lambda r: float(r["score"]))
        gap = float(best["score"]) - float(worst["score"])
        if gap == 0:
            counts["dropped_all_equal"] += 1
            continue
        if not gap > margin:
            counts["dropped_below_margin"] += 1
            continue
        counts["pairs"] += 1
        pairs.append({
            "prompt_id": prompt_id, "prompt": best["prompt"], "chosen": best["response"],
            "rejected": worst["response"], "chosen_score": float(best["score"]),
            "rejected_score": float(worst["score"]),
            "chosen_source": str(best.get("source", "")), "rejected_source": str(worst.get("source", "")),
        })
    return pairs, counts


def read_pairs(path: str | os.PathLike):
    """The pairs ``Dataset`` (split ``train``) of a judge or reference stage, with a clear error naming the path."""
    import datasets

    p = Path(path)
    if not (p / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"no DPO pairs at {p} (expected a DatasetDict; run judge_candidates first)")
    dsd = datasets.load_from_disk(str(p))
    if "train" not in dsd:
        raise KeyError(f"DPO pairs {p} have no 'train' split (have {sorted(dsd)})")
    ds = dsd["train"]
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise KeyError(f"DPO pairs {p} lack column(s) {missing}")
    return ds


def resolve_lengths(cfg: Mapping[str, Any], training: Mapping[str, Any]) -> tuple[int, str]:
    """(max_length, precision): dpo.max_length else training.max_length."""
    max_length = cfg.get("max_length") or (training or {}).get("max_length")
    if not max_length:
        raise ValueError("dpo.max_length is null and training.max_length is not set")
    return int(max_length), str((training or {}).get("precision", section_defaults("training")["precision"]))


def encode_pairs(tokenizer, rows: Sequence[Mapping[str, Any]], max_length: int | None
                 ) -> tuple[list[dict[str, Any]], int]:
    """prompt/chosen/rejected ids per pair (``index`` = row number); pairs over ``max_length`` dropped, counted."""
    out, dropped = [], 0
    for i, r in enumerate(rows):
        p = encode_prompt(tokenizer, r["prompt"])
        c = encode_prompt_response(tokenizer, r["prompt"], r["chosen"], max_length)
        j = encode_prompt_response(tokenizer, r["prompt"], r["rejected"], max_length)
        if c is None or j is None:
            dropped += 1
            continue
        out.append({"index": i, "prompt_ids": p, "chosen_ids": c["input_ids"][len(p):],
                    "rejected_ids": j["input_ids"][len(p):]})
    return out, dropped


def pair_tokens(e: Mapping[str, Sequence[int]]) -> int:
    return len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
