"""GSM8K-style answer extraction and exact match, mirroring lm-evaluation-harness's ``gsm8k`` task exactly.

The patterns, the filter semantics (``regex`` then ``take_first``; no match -> the ``[invalid]`` fallback) and the
``exact_match`` normalisation are copied from lm_eval 0.4.13's ``tasks/gsm8k/gsm8k.yaml``; a test runs the same
outputs through lm-eval's own filter pipeline and metric and asserts identical results, so the two backends'
scores are comparable.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

# lm_eval/tasks/gsm8k/gsm8k.yaml, filter_list
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")            # strict-match, group_select 0
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")   # flexible-extract, group_select -1
FALLBACK = "[invalid]"                                          # lm_eval RegexFilter's default fallback
# lm_eval/tasks/gsm8k/gsm8k.yaml, metric_list exact_match (ignore_case: true, ignore_punctuation: false)
REGEXES_TO_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
IGNORE_CASE = True


def _regex_extract(pattern: re.Pattern, text: str, group_select: int) -> str | None:
    """lm_eval ``RegexFilter.apply`` for one response; None where lm-eval would return the fallback."""
    if not isinstance(text, str):
        text = ""
    matches = pattern.findall(text)
    if not matches:
        return None
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), None)
        if match is None:
            return None
    return match.strip()


def extract_strict(text: str) -> str | None:
    """The number after the first ``#### `` (GSM8K 'strict-match'), or None."""
    return _regex_extract(STRICT_PATTERN, text, 0)


def extract_flexible(text: str) -> str | None:
    """The last number-like span in the text (GSM8K 'flexible-extract'), or None."""
    return _regex_extract(FLEXIBLE_PATTERN, text, -1)


def normalize(text: str) -> str:
    """lm_eval ``exact_match_hf_evaluate`` normalisation with the gsm8k YAML's options."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower() if IGNORE_CASE else text


def exact_match(pred: str | None, gold: str) -> bool:
    """Gold may be a bare answer or a full worked solution (the ``.*#### `` rule strips up to the answer)."""
    return normalize(FALLBACK if pred is None else pred) == normalize(str(gold))


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 1234) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-item scores (resampling items with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D list of per-item scores")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // x.size)  # bound memory at ~32 MB of indices
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample std, ddof=1), as lm-eval's ``mean_stderr``."""
    x = np.asarray(values, dtype=np.float64)
    return float(math.sqrt(x.var(ddof=1) / x.size)) if x.size > 1 else 0.0


def per_item(outputs: Sequence[str], golds: Sequence[str]) -> dict[str, list[dict]]:
    """Per-item extracted prediction and correctness for both extractors."""
    if len(outputs) != len(golds):
        raise ValueError(f"{len(outputs)} outputs but {len(golds)} gold answers")
    items: dict[str, list[dict]] = {"strict": [], "flexible": []}
    for out, gold in zip(outputs, golds):
        for name, extract in (("strict", extract_strict), ("flexible", extract_flexible)):
            pred = extract(out)
            items[name].append({"pred": pred, "correct": exact_match(pred, gold)})
    return items


def score(outputs: Sequence[str], golds: Sequence[str], *, n_boot: int = 1000, confidence: float = 0.95,
          seed: int = 1234) -> dict[str, dict[str, float]]:
    """``{strict: {acc, ci_low, ci_high, stderr, n}, flexible: {...}}``."""
    items = per_item(outputs, golds)
    result = {}
    for name, rows in items.items():
        correct = [float(r["correct"]) for r in rows]
        if not correct:
            raise ValueError("nothing to score: no outputs")
        low, high = bootstrap_ci(correct, n_boot, confidence, seed)
        result[name] = {"acc": float(np.mean(correct)), "ci_low": low, "ci_high": high,
                        "stderr": stderr(correct), "n": len(correct)}
    return result
