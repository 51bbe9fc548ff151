"""Best-vs-worst preference pairs from judged candidates (pure; no model, no IO)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

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
