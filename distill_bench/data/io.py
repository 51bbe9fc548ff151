"""Dataset directory IO: atomic save, load with clear errors, and the content hash downstream caches key on.

The content hash covers the records only (split name + every column of every row, canonical JSON), not the Arrow
files, so it is stable across `datasets` versions and re-saves of identical data.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import datasets

from distill_bench.atomic import atomic_write_json, write_dir_atomically

SCHEMA_COLUMNS = ("id", "prompt", "response", "answer", "source")
SPLITS = ("train", "eval")
SUMMARY_FILE = "summary.json"  # not HF's dataset_info.json, which save_to_disk writes per split


def content_hash(dsd: datasets.DatasetDict) -> str:
    """sha256 over canonical JSON lines ``{"split": ..., <row>}`` for every split (sorted) and row (in order)."""
    h = hashlib.sha256()
    for split in sorted(dsd):
        for row in dsd[split]:
            line = json.dumps({"split": split, **row}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            h.update(line.encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def save_dataset_dir(dsd: datasets.DatasetDict, out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """save_to_disk into a temporary sibling dir, add the summary, then rename onto ``out_dir``.

    A reader never sees a half-written directory; an existing ``out_dir`` is swapped out and removed afterwards.
    """
    def write(tmp: Path) -> None:
        dsd.save_to_disk(str(tmp))
        atomic_write_json(tmp / SUMMARY_FILE, summary, sort_keys=True, allow_nan=True)

    return write_dir_atomically(out_dir, write)


def load_dataset_dir(path: str | os.PathLike) -> datasets.DatasetDict:
    """Load a prepared dataset dir (train/eval splits in the common schema), failing with the path named."""
    p = Path(path)
    if not (p / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"no prepared dataset at {p} (expected {p / 'dataset_dict.json'}; "
                                f"run the prepare_data stage first)")
    dsd = datasets.load_from_disk(str(p))
    if not isinstance(dsd, datasets.DatasetDict):
        raise ValueError(f"{p} holds a single Dataset, expected a DatasetDict with splits {SPLITS}")
    missing = [s for s in SPLITS if s not in dsd]
    if missing:
        raise ValueError(f"{p} lacks split(s) {missing}; found {sorted(dsd)}")
    for split in SPLITS:
        cols = [c for c in SCHEMA_COLUMNS if c not in dsd[split].column_names]
        if cols:
            raise ValueError(f"{p} split {split!r} lacks column(s) {cols} of the common schema {SCHEMA_COLUMNS}")
    return dsd


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / SUMMARY_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no {SUMMARY_FILE} in {Path(path)}; was it written by prepare_data?")
    return json.loads(p.read_text())


def dataset_content_hash(path: str | os.PathLike, *, recompute: bool = False) -> str:
    """Content hash of a prepared dataset dir: from its summary (cheap) or recomputed from the records."""
    if not recompute and (Path(path) / SUMMARY_FILE).is_file():
        value = read_summary(path).get("content_hash")
        if isinstance(value, str) and value:
            return value
    return content_hash(load_dataset_dir(path))


def dataset_hash_or_none(dataset: str | os.PathLike) -> str | None:
    """Content hash of a prepared dataset dir for a settings fingerprint; None when it has none to read."""
    try:
        return dataset_content_hash(dataset)
    except (FileNotFoundError, ValueError):
        return None
