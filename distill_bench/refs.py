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


def _offline_mode() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_error(target: str, what: str, exc: BaseException, config_key: str | None = None) -> FileNotFoundError:
    """The error for a model/tokenizer that would not load; for a hub id it says to point the config at a local
    copy, since the usual cause is an offline node (HF_HUB_OFFLINE=1 or no network) without the id in its cache."""
    target = str(target)
    if is_local_ref(target) or not could_be_hub_id(target):
        return FileNotFoundError(f"could not load a {what} from {target!r}: {exc}")
    mode = "HF_HUB_OFFLINE is set" if _offline_mode() else "the hub could not be reached or refused it"
    key = f" ({config_key})" if config_key else ""
    name = target.rsplit("/", 1)[-1]
    return FileNotFoundError(
        f"could not load a {what} from hub id {target!r}{key}: it is not in the local Hugging Face cache and {mode}. "
        f"On a machine with network run `huggingface-cli download {target} --local-dir /models/{name}`, copy that "
        f"directory here and point the config at the local copy (name_or_path: /models/{name}). [{exc}]")
