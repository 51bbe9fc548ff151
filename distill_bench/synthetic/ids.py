"""Artifact ids of synthetic sets, computed at Snakefile parse time (pure Python: no torch, no datasets).

Two ids, so that changing only a filter re-runs only the merge:

* :func:`generation_shard_key` names the *generated* shards: it hashes what changes the teacher's outputs
  (dataset, backend, decoding settings, batch size -- which fixes the generation chunks and their seeds --,
  ``n_prompts``, and optionally the run seed and teacher). Filters and the shard count are not in it: shards can be
  shared by several filter settings, and the merged set does not depend on how many shards produced it.
* :func:`synthetic_artifact_id` names the merged, filtered set: the same decoding fields plus the normalised
  filters.

Both read ``<dataset>-t<temperature>-p<top_p>-n<max_new_tokens>-s<samples>-<hash8>``; the readable prefix is for
humans, the hash is what makes the id unique.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

from distill_bench.defaults import KERNEL_KEYS, section_defaults

# keys of the synthetic section that never change the artifact: how the work is split, and kernel choices
NEUTRAL_KEYS = ("shards", *KERNEL_KEYS)
# the schema's `synthetic` section (a missing key means the default): decoding keys, and the filters
DECODING_DEFAULTS: dict[str, Any] = {k: v for k, v in section_defaults("synthetic").items()
                                     if k not in (*NEUTRAL_KEYS, "filters")}
FILTER_DEFAULTS: dict[str, Any] = section_defaults("synthetic", "filters")


def _decoding(synthetic: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(synthetic) - set(DECODING_DEFAULTS) - set(NEUTRAL_KEYS) - {"filters"})
    if unknown:
        raise ValueError(f"unknown key(s) synthetic.{unknown[0]}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                         + f"; known: {sorted([*DECODING_DEFAULTS, *NEUTRAL_KEYS, 'filters'])}")
    d = {k: synthetic.get(k, v) for k, v in DECODING_DEFAULTS.items()}
    d["temperature"] = float(d["temperature"])
    d["top_p"] = float(d["top_p"])
    if d["temperature"] == 0.0:
        d["top_p"] = 1.0  # greedy decoding ignores top_p: same outputs, same id
    for key in ("max_new_tokens", "samples_per_prompt", "batch_size"):
        d[key] = int(d[key])
    if d["n_prompts"] is not None:
        d["n_prompts"] = int(d["n_prompts"])
    return d


def normalize_filters(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Filters with defaults filled and equivalent spellings unified (min_tokens 0 == null, dedup true == 'prompt')."""
    filters = dict(filters or {})
    unknown = sorted(set(filters) - set(FILTER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown filter synthetic.filters.{unknown[0]}; known: {sorted(FILTER_DEFAULTS)}")
    f = {k: filters.get(k, v) for k, v in FILTER_DEFAULTS.items()}
    f["min_tokens"] = int(f["min_tokens"] or 0) or None
    f["max_tokens"] = None if f["max_tokens"] is None else int(f["max_tokens"])
    f["drop_truncated"] = bool(f["drop_truncated"])
    f["dedup"] = {True: "prompt", False: None, None: None}.get(f["dedup"], f["dedup"])
    f["verify_answer"] = {True: "strict", False: None, None: None}.get(f["verify_answer"], f["verify_answer"])
    return f


def _hash8(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def _prefix(dataset_name: str, d: Mapping[str, Any]) -> str:
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", str(dataset_name)) or "data"
    return (f"{name}-t{d['temperature']:g}-p{d['top_p']:g}-n{d['max_new_tokens']}-s{d['samples_per_prompt']}")


def generation_shard_key(dataset_name: str, synthetic: Mapping[str, Any], *, seed: int | None = None,
                         teacher: str | None = None) -> str:
    """Id of the generated (unfiltered) shards; independent of ``synthetic.filters`` and ``synthetic.shards``."""
    d = _decoding(synthetic)
    payload = {"kind": "generation", "dataset": str(dataset_name), "decoding": d, "seed": seed, "teacher": teacher}
    return f"{_prefix(dataset_name, d)}-{_hash8(payload)}"


def synthetic_artifact_id(dataset_name: str, synthetic: Mapping[str, Any], *, seed: int | None = None,
                          teacher: str | None = None) -> str:
    """Id of the merged, filtered synthetic set: decoding + filters (not the shard count)."""
    d = _decoding(synthetic)
    payload = {"kind": "synthetic", "dataset": str(dataset_name), "decoding": d, "seed": seed, "teacher": teacher,
               "filters": normalize_filters(synthetic.get("filters"))}
    return f"{_prefix(dataset_name, d)}-{_hash8(payload)}"
