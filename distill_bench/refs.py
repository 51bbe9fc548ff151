"""Local path or Hugging Face hub id? One rule for models, tokenizers and datasets, at planning and at stage time.

* **local** when the string is absolute (``/x``), starts with ``./``, ``../`` or ``~``, or names something that
  exists on disk (relative to the working directory, which under Snakemake is ``--directory``): ``models/teacher``
  that exists is the local directory, never a hub lookup;
* **hub id** when it does not exist on disk and has the shape of one: ``name`` or ``owner/name`` (letters, digits,
  ``-``, ``_``, ``.``), without a data-file suffix;
* anything else (``a/b/c``, ``train.parquet``, a backslash) is a path that does not exist: refused with the key named,
  before any job runs, instead of being sent to the hub.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

LOCAL_PREFIXES = ("/", "./", "../", "~")
DATA_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".txt", ".safetensors", ".bin", ".gguf")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def is_local_ref(ref: str) -> bool:
    """True when ``ref`` means a local path (see the module docstring)."""
    ref = str(ref)
    return ref.startswith(LOCAL_PREFIXES) or Path(ref).expanduser().exists()


def could_be_hub_id(ref: str) -> bool:
    """True when ``ref`` has the shape of a hub id (``name`` or ``owner/name``, no data-file suffix)."""
    ref = str(ref)
    return bool(_HUB_ID.fullmatch(ref)) and not ref.lower().endswith(DATA_FILE_SUFFIXES) and not ref.endswith(".")


def missing_local_path(ref: str) -> bool:
    """True when ``ref`` must be a local path (it cannot be a hub id) but nothing exists there."""
    ref = str(ref)
    if Path(ref).expanduser().exists():
        return False
    return ref.startswith(LOCAL_PREFIXES) or not could_be_hub_id(ref) or (os.sep != "/" and os.sep in ref)
