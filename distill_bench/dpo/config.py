"""The ``dpo`` config section: defaults and validation, errors naming ``dpo.<key>``.

Kept torch-free so the planner and the stages validate the same way.
"""
from __future__ import annotations

from typing import Any, Mapping

from distill_bench.defaults import allowed_values, section_defaults

# the schema's `dpo` section; start_from and judge_model are read by the planner and carried through unchanged
DEFAULTS: dict[str, Any] = section_defaults("dpo")
SOURCES = allowed_values("dpo", "sample_source")
JUDGES = allowed_values("dpo", "judge")
HF_DECODE = allowed_values("dpo", "hf_decode")
HF_PREFILL = allowed_values("dpo", "hf_prefill")
# TRL 1.16 DPOTrainer loss types that take one pair per row and no extra hyper-parameter we do not expose
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def normalize_dpo(dpo: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and every value checked; unknown keys are an error naming ``dpo.<key>``."""
    if dpo is None:
        dpo = {}
    if not isinstance(dpo, Mapping):
        raise TypeError(f"dpo must be a mapping, got {type(dpo).__name__}")
    unknown = sorted(set(dpo) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join('dpo.' + k for k in unknown)}; known: {', '.join(DEFAULTS)}")
    d = {**DEFAULTS, **dict(dpo)}

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"dpo.{key} {why}, got {d[key]!r}")

    if not _is_num(d["beta"]) or d["beta"] <= 0:
        raise bad("beta", "must be a number > 0")
    if d["sample_source"] not in SOURCES:
        raise bad("sample_source", f"must be one of {', '.join(SOURCES)}")
    for key in ("samples_per_prompt", "max_new_tokens", "batch_size", "epochs"):
        if not _is_int(d[key]) or d[key] < 1:
            raise bad(key, "must be an integer >= 1")
    if d["samples_per_prompt"] < 2 and d["sample_source"] != "both":
        raise bad("samples_per_prompt", "must be >= 2 with a single sample_source (a pair needs two candidates)")
    if not _is_num(d["temperature"]) or d["temperature"] < 0:
        raise bad("temperature", "must be a number >= 0")
    if d["temperature"] == 0 and d["samples_per_prompt"] > 1:
        raise bad("temperature", "must be > 0 when samples_per_prompt > 1 (greedy samples are identical)")
    if not _is_num(d["top_p"]) or not 0 < d["top_p"] <= 1:
        raise bad("top_p", "must be in (0, 1]")
    if d["n_prompts"] is not None and (not _is_int(d["n_prompts"]) or d["n_prompts"] < 1):
        raise bad("n_prompts", "must be null or an integer >= 1")
    if d["judge"] not in JUDGES:
        raise bad("judge", f"must be one of {', '.join(JUDGES)}")
    if not _is_num(d["margin"]) or d["margin"] < 0:
        raise bad("margin", "must be a number >= 0")
    if d["lr"] is not None and (not _is_num(d["lr"]) or d["lr"] <= 0):
        raise bad("lr", "must be null or a number > 0")
    if not isinstance(d["precompute_ref_logprobs"], bool):
        raise bad("precompute_ref_logprobs", "must be true or false")
    if d["hf_decode"] not in HF_DECODE:
        raise bad("hf_decode", f"must be one of {', '.join(HF_DECODE)}")
    if d["hf_prefill"] not in HF_PREFILL:
        raise bad("hf_prefill", f"must be one of {', '.join(HF_PREFILL)}")
    if d["loss_type"] not in LOSS_TYPES:
        raise bad("loss_type", f"must be one of {', '.join(LOSS_TYPES)}")
    if d["max_length"] is not None and (not _is_int(d["max_length"]) or d["max_length"] < 2):
        raise bad("max_length", "must be null or an integer >= 2")
    return d


def sources_for(sample_source: str) -> tuple[str, ...]:
    """Model labels a sample_source draws from, in a fixed order (the order of the candidate rows)."""
    return ("teacher", "student") if sample_source == "both" else (sample_source,)
