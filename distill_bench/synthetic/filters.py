"""Filters for teacher generations, each optional and each counted.

The filters run in a fixed order and every dropped sample is charged to the *first* filter that rejects it, so the
per-reason counts add up to ``input - kept``:

1. ``drop_truncated`` -- no EOS within ``max_new_tokens`` (``finished`` False): an unfinished answer.
2. ``min_tokens`` -- fewer generated tokens than this (EOS included in the count).
3. ``max_tokens`` -- more generated tokens than this.
4. ``verify_answer`` -- the final answer extracted from the response differs from the reference ``answer``
   (rejection sampling; ``true``/``"strict"`` uses the ``#### <answer>`` line, ``"flexible"`` the last number).
5. ``dedup`` -- an exact duplicate (byte-identical response) of a sample kept earlier: ``true``/``"prompt"``
   compares responses to the same prompt text (repeats among ``samples_per_prompt`` samples, or repeated prompts),
   ``"global"`` compares responses across all prompts. The first occurrence (in merged order) is kept.

Verification runs before dedup so a global duplicate that is wrong for one prompt cannot push out the copy that is
correct for another. A missing key (or ``None``/``False``) disables that filter; the stage fills the config
defaults first (see :func:`distill_bench.synthetic.ids.normalize_filters`).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

ORDER = ("drop_truncated", "min_tokens", "max_tokens", "verify_answer", "dedup")


class NoSurvivorsError(ValueError):
    """Every sample was removed; the message names the filter that removed the last ones."""


def _bad(key: str, why: str, value: Any) -> ValueError:
    return ValueError(f"synthetic.filters.{key} {why} (got {value!r})")


def _int_or_none(key: str, value: Any, low: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(key, f"must be null or an integer >= {low}", value)
    return value


def _validate(filters: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(filters, Mapping):
        raise TypeError(f"synthetic.filters must be a mapping, got {type(filters).__name__}")
    unknown = [k for k in filters if k not in ORDER]
    if unknown:
        raise ValueError(f"unknown filter synthetic.filters.{unknown[0]}; known filters: {', '.join(ORDER)}")
    f: dict[str, Any] = {}
    f["min_tokens"] = _int_or_none("min_tokens", filters.get("min_tokens"), 0) or None
    f["max_tokens"] = _int_or_none("max_tokens", filters.get("max_tokens"), 1)
    if f["min_tokens"] is not None and f["max_tokens"] is not None and f["min_tokens"] > f["max_tokens"]:
        raise _bad("min_tokens", f"must not exceed synthetic.filters.max_tokens ({f['max_tokens']})", f["min_tokens"])
    truncated = filters.get("drop_truncated", False)
    if truncated is not None and not isinstance(truncated, bool):
        raise _bad("drop_truncated", "must be true or false", truncated)
    f["drop_truncated"] = bool(truncated)
    dedup = filters.get("dedup", False)
    dedup = {True: "prompt", False: None, None: None}.get(dedup, dedup) if isinstance(dedup, (bool, type(None))) \
        else dedup
    if dedup not in (None, "prompt", "global"):
        raise _bad("dedup", "must be true/false, 'prompt' or 'global'", dedup)
    f["dedup"] = dedup
    verify = filters.get("verify_answer", False)
    verify = {True: "strict", False: None, None: None}.get(verify, verify) if isinstance(verify, (bool, type(None))) \
        else verify
    if verify not in (None, "strict", "flexible"):
        raise _bad("verify_answer", "must be true/false, 'strict' or 'flexible'", verify)
    f["verify_answer"] = verify
    return f


_STRICT = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _verifier(mode: str) -> Callable[[str, Any], bool]:
    """``(response, reference) -> correct?`` using the eval module's extraction and exact match, so 'correct'
    means the same thing when filtering as when scoring."""
    try:
        from distill_bench.eval import scoring  # lazy: eval is a sibling module, not a hard dependency

        extract = getattr(scoring, f"extract_{mode}")
        match = scoring.exact_match
    except (ImportError, AttributeError):
        # same rules as GSM8K: strict = the number on the '#### ' line, flexible = the last number in the text
        def extract(text: str) -> str | None:
            found = _STRICT.findall(text) if mode == "strict" else _NUMBER.findall(text)
            return found[-1] if found else None

        def match(pred: str | None, gold: Any) -> bool:
            return pred is not None and _canonical(pred) == _canonical(gold)
    return lambda response, reference: bool(match(extract(response), str(reference)))


def _canonical(answer: Any) -> str | None:
    """'1,000' == '1000' == '1000.0'; non-numeric answers compare as stripped strings."""
    text = str(answer).strip().replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def apply_filters(records: Iterable[Mapping[str, Any]], filters: Mapping[str, Any]
                  ) -> tuple[list[Mapping[str, Any]], dict[str, Any]]:
    """Return ``(kept, counts)``; ``counts = {'input', 'kept', 'dropped': {filter: n}}`` lists every enabled
    filter (zero included, so a filter that removed nothing is visible). Raises :class:`NoSurvivorsError` naming
    the filter that removed the last samples when nothing survives."""
    f = _validate(filters)
    records = list(records)
    enabled = [name for name in ORDER if f[name] not in (None, False)]
    dropped = {name: 0 for name in enabled}
    verify = _verifier(f["verify_answer"]) if f["verify_answer"] else None
    if verify is not None:
        missing = sum(r.get("answer") is None for r in records)
        if missing:
            raise ValueError(f"synthetic.filters.verify_answer is on but {missing} of {len(records)} samples have no "
                             "reference 'answer' (the dataset is not verifiable); turn the filter off")
    seen: set = set()
    kept: list[Mapping[str, Any]] = []
    last_emptied = None
    alive = len(records)
    for r in records:
        reason = None
        for name in enabled:
            if name == "drop_truncated" and not r["finished"]:
                reason = name
            elif name == "min_tokens" and r["generated_tokens"] < f["min_tokens"]:
                reason = name
            elif name == "max_tokens" and r["generated_tokens"] > f["max_tokens"]:
                reason = name
            elif name == "verify_answer" and not verify(r["response"], r["answer"]):
                reason = name
            elif name == "dedup":
                key = (r["prompt"], r["response"]) if f["dedup"] == "prompt" else r["response"]
                if key in seen:
                    reason = name
                else:
                    seen.add(key)
            if reason:
                break
        if reason:
            dropped[reason] += 1
        else:
            kept.append(r)
    counts = {"input": len(records), "kept": len(kept), "dropped": dropped}
    if not kept:
        if not records:
            raise NoSurvivorsError("no synthetic samples to filter: the generation shards are empty "
                                   "(every prompt dropped as too long, or synthetic.n_prompts selected none)")
        # walk the filters in order: the one whose drops take the running count to zero removed the last samples
        for name in enabled:
            alive -= dropped[name]
            if alive == 0:
                last_emptied = name
                break
        worst = max(enabled, key=lambda n: dropped[n])
        raise NoSurvivorsError(
            f"no synthetic samples survive the filters: synthetic.filters.{last_emptied} removed the last ones "
            f"(input {len(records)}, dropped {dropped}; most drops: synthetic.filters.{worst}). "
            f"Relax or disable synthetic.filters.{last_emptied}.")
    return kept, counts
