"""Judges that score DPO candidates, and the robust parser for an LLM judge's reply.

* ``verifier``: task correctness (1.0 / 0.0) with the eval module's GSM8K-style extraction and exact match.
* ``teacher_logprob``: the *mean* per-token log-likelihood of the response under the judge model. The original study
  summed it, which rewards short answers; normalising by length removes that bias.
* ``llm``: the judge model is asked for 'Score: N' (1..10); an unparseable reply scores None (counted and dropped
  by ``build_pairs``), never an exception.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence
from distill_bench.eval.scoring import exact_match, extract_flexible, extract_strict
from distill_bench.generation import GenerationSettings, generate
from distill_bench.models.tokenizer import encode_prompt_response

RUBRIC = "Rate the answer from 1 to 10. Reply with 'Score: N'."
SCORE_MIN, SCORE_MAX = 1.0, 10.0

_NUM = r"(\d+(?:\.\d+)?)(?!\.?\d)(?![A-Za-z])"
_PATTERNS = (
    re.compile(r"\bscore\s*(?:[:=]|is|-|of)?\s*\**\s*" + _NUM, re.IGNORECASE),   # Score: 7, score=6.5, **Score:** 8
    re.compile(r"(?<![\d.])" + r"(\d+(?:\.\d+)?)" + r"\s*/\s*10(?!\d)"),          # 7/10
    re.compile(r"\*\*\s*" + _NUM + r"\s*\*\*"),                                     # **8**
    re.compile(r"^\s*" + _NUM + r"\s*[.!]?\s*$"),                                   # the whole reply is "8"
)


def parse_judge_score(text: Any) -> float | None:
    """The 1..10 score in a judge reply, or None when it is missing, ambiguous (several different scores) or out of
    range (a 0 or 15 is more likely a misread than a clamped opinion, so it is not clamped)."""
    if not isinstance(text, str) or not text.strip():
        return None
    for pattern in _PATTERNS:
        found = {float(m) for m in pattern.findall(text)}
        if not found:
            continue
        if len(found) > 1:
            return None
        value = found.pop()
        if not math.isfinite(value) or not SCORE_MIN <= value <= SCORE_MAX:
            return None
        return value
    return None


def judge_prompt(prompt: str, response: str) -> str:
    return f"Question:\n{prompt}\n\nAnswer:\n{response}\n\n{RUBRIC}"


# --------------------------------------------------------------------------------------------- verifier


def score_verifier(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """1.0 where the extracted answer (strict '#### N', else the last number) equals the reference answer."""

    scores = []
    for r in rows:
        gold = r.get("answer")
        if gold is None or str(gold).strip() == "":
            raise ValueError(f"judge 'verifier' needs a reference answer, but candidate of prompt "
                             f"{r.get('prompt_id')!r} has none (pick dpo.judge teacher_logprob or llm for this "
                             "dataset)")
        text = r.get("response") or ""
        pred = extract_strict(text)
        if pred is None:
            pred = extract_flexible(text)
        scores.append(1.0 if exact_match(pred, str(gold)) else 0.0)
    return scores


# --------------------------------------------------------------------------------------------- log-likelihood


def sequence_logprobs(model, sequences: Sequence[Mapping[str, Sequence[int]]], batch_size: int,
                      pad_token_id: int) -> list[tuple[float, int]]:
    """(sum of log p, number of tokens) over each sequence's ``completion_mask`` positions, teacher-forced.

    Batched with right padding and an attention mask; padded positions never enter a sum, and the rows are
    length-sorted only to cut padding, so the result does not depend on the batch composition.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
    out: list[tuple[float, int] | None] = [None] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(sequences[i]["input_ids"]) for i in idx)
                ids = torch.full((len(idx), width), int(pad_token_id), dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                comp = torch.zeros((len(idx), width), dtype=torch.bool)
                for row, i in enumerate(idx):
                    seq = sequences[i]
                    n = len(seq["input_ids"])
                    if len(seq["completion_mask"]) != n:
                        raise ValueError("input_ids and completion_mask differ in length")
                    ids[row, :n] = torch.tensor(list(seq["input_ids"]))
                    att[row, :n] = 1
                    comp[row, :n] = torch.tensor([bool(m) for m in seq["completion_mask"]])
                ids, att = ids.to(device), att.to(device)
                logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
                for row, i in enumerate(idx):  # per row in fp32: never a (batch, len, vocab) fp32 copy
                    mask = comp[row, 1:].to(device)
                    lp = torch.log_softmax(logits[row, :-1].float(), dim=-1)
                    tok = lp.gather(-1, ids[row, 1:].unsqueeze(-1)).squeeze(-1)
                    out[i] = (float(tok[mask].sum()), int(mask.sum()))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def score_teacher_logprob(model, tokenizer, rows: Sequence[Mapping[str, Any]], batch_size: int
                          ) -> tuple[list[float], int]:
    """Length-normalised log-likelihood of each response (its tokens incl. the closing EOS) given its prompt.

    Returns (scores, tokens forwarded): every templated prompt+response token, padding excluded.
    """

    seqs = []
    for r in rows:
        enc = encode_prompt_response(tokenizer, r["prompt"], r.get("response") or "", None)
        seqs.append(enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums = sequence_logprobs(model, seqs, batch_size, pad)
    scores = [s / n for s, n in sums]
    return scores, sum(len(s["input_ids"]) for s in seqs)


# --------------------------------------------------------------------------------------------- LLM judge


def score_llm(model, tokenizer, rows: Sequence[Mapping[str, Any]], batch_size: int, seed: int,
              max_new_tokens: int = 16, on_batch: Callable[[int, float], None] | None = None
              ) -> tuple[list[float | None], list[str], dict[str, int]]:
    """Greedy-generate the judge's reply for every candidate and parse it.

    Returns (scores with None for malformed replies, raw replies, token totals {input_tokens, generated_tokens}).
    """

    settings = GenerationSettings(backend="hf", batch_size=int(batch_size), max_new_tokens=int(max_new_tokens),
                                  temperature=0.0, num_samples=1, seed=int(seed), prompt_overflow="truncate")
    prompts = [judge_prompt(r["prompt"], r.get("response") or "") for r in rows]
    results = sorted(generate(model, tokenizer, prompts, settings, on_batch=on_batch),
                     key=lambda res: res.prompt_index)
    texts = [res.text for res in results]
    totals = {"input_tokens": sum(res.prompt_tokens for res in results if not res.dropped),
              "generated_tokens": sum(res.generated_tokens for res in results)}
    return [parse_judge_score(t) for t in texts], texts, totals
