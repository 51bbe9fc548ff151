"""Artifact plumbing every stage shares, so the atomicity and resume rules live in one place.

- directories appear whole: written into a temporary sibling, then renamed over the target (``write_dir_atomically``);
- settings fingerprints key on the input dataset's content hash (``dataset_hash_or_none``);
- long generation stages checkpoint finished chunks as JSON lines beside their output (``ChunkCheckpoint``) and, on a
  rerun, reuse them only when every setting that changes the output is identical.

File writes go through :mod:`distill_bench.energy.atomic` (fsync'd temp file + ``os.replace``). No torch or
``datasets`` import at module level.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from distill_bench.energy.atomic import atomic_write_json, atomic_write_text, make_temp_dir

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished ``tmp`` over ``out``; an existing ``out`` is moved aside first and removed afterwards."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(out: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling of ``out``, then rename it over ``out``.

    A reader never sees a half-written directory; on any error (or signal) the temporary directory is removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        write(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def dataset_hash_or_none(dataset: str | os.PathLike) -> str | None:
    """Content hash of a prepared dataset dir for a settings fingerprint; None when it has none to read."""
    try:
        from distill_bench.data.io import dataset_content_hash

        return dataset_content_hash(dataset)
    except (FileNotFoundError, ValueError):
        return None


def short_hash(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON (sorted keys, ``str`` for the rest): a fingerprint field."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """JSON lines (UTF-8 kept as is, NaN/inf refused)."""
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)


class ChunkCheckpoint:
    """Finished chunks of a resumable stage, as ``chunk-<n>.jsonl`` files under ``directory``.

    ``progress.json`` holds the settings ``fingerprint``; chunks found beside a different or unreadable fingerprint
    are discarded on load, so output never mixes settings. ``done`` maps chunk index -> rows.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: Mapping[str, Any], what: str = "output") -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.done: dict[int, list[dict]] = self._load(what)

    def _load(self, what: str) -> dict[int, list[dict]]:
        if not self.dir.is_dir():
            return {}
        try:
            saved = json.loads((self.dir / PROGRESS_FILE).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            saved = None
        if saved != json.loads(json.dumps(self.fingerprint)):
            log.info("discarding partial %s in %s (settings changed or unreadable)", what, self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            return {}
        done: dict[int, list[dict]] = {}
        for f in sorted(self.dir.glob("chunk-*.jsonl")):
            done[int(f.stem.split("-")[1])] = [json.loads(line) for line in f.read_text().splitlines() if line]
        log.info("resuming from %s: %d chunk(s) already generated", self.dir, len(done))
        return done

    def start(self) -> None:
        """Create the directory and write the fingerprint first: chunks without one are never reused."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / PROGRESS_FILE, {"fingerprint": self.fingerprint})

    def save(self, index: int, rows: list[dict]) -> None:
        """Checkpoint chunk ``index`` (atomic) and remember its rows."""
        atomic_write_text(self.dir / f"chunk-{index:06d}.jsonl", jsonl_text(rows))
        self.done[index] = rows
