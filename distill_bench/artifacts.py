"""Resumable generation output: long generation stages checkpoint finished chunks as JSON lines beside their
output (``ChunkCheckpoint``) and, on a rerun, reuse them only when every setting that changes the output is identical.

File and directory writes go through :mod:`distill_bench.atomic`. No torch or ``datasets`` import.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from distill_bench.atomic import atomic_write_json, atomic_write_text, jsonl_text

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"


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
