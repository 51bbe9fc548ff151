"""Atomic file writes: a reader (or a crash) never sees half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def process_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(prefix: str, parent: str | os.PathLike) -> Path:
    """``tempfile.mkdtemp`` with the mode a plain ``mkdir`` gets: mkdtemp's 0700 would survive the rename onto the
    output and hide it from the group on shared cluster storage."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~process_umask())
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` via a temp file in the same directory, fsync, then ``os.replace``. ``fsync=False`` for frequent
    snapshots: a crash of the process still never leaves half a file (only a power loss could lose the last one).
    The file gets the mode a plain ``open`` would give it (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False, allow_nan: bool = False,
                      default: Callable[[Any], Any] | None = None, fsync: bool = True,
                      indent: int | None = 2) -> Path:
    """JSON version of :func:`atomic_write_text`. NaN/inf are refused by default (they are not JSON); writers whose
    payload may legitimately hold a diverged loss pass ``allow_nan=True``."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    return atomic_write_text(path, text + "\n", fsync=fsync)


def check_writable_dir(directory: str | os.PathLike, what: str = "output") -> Path:
    """Create ``directory`` and prove we can write there, so a bad path fails before the work, not after."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PermissionError(f"energy: {what} directory {str(directory)!r} is not writable: {exc}") from exc
    return directory
