"""Outputs are written with the process umask (group-readable under the usual 022 / 002), as a plain open() or
mkdir() would create them: stage JSONs, cache manifests, training logs and atomically written directories go to shared
cluster storage where the group must read them."""
from __future__ import annotations

import os
import stat

import pytest

from distill_bench.artifacts import write_dir_atomically
from distill_bench.energy.atomic import atomic_write_json, atomic_write_text


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_writes_follow_the_umask(tmp_path, umask):
    atomic_write_json(tmp_path / "stage.json", {"status": "complete"})
    atomic_write_text(tmp_path / "train_log.txt", "ok\n")
    assert _mode(tmp_path / "stage.json") == 0o666 & ~umask
    assert _mode(tmp_path / "train_log.txt") == 0o666 & ~umask


def test_atomically_written_directories_follow_the_umask(tmp_path, umask):
    out = write_dir_atomically(tmp_path / "cache", lambda d: atomic_write_json(d / "manifest.json", {"k": 1}))
    assert _mode(out) == 0o777 & ~umask
    assert _mode(out / "manifest.json") == 0o666 & ~umask


def test_kd_cache_directory_and_manifest_follow_the_umask(tmp_path, umask):
    import numpy as np

    from distill_bench.kd.cache import CacheWriter

    writer = CacheWriter(tmp_path / "logits", k=2, value_dtype="float16", vocab_size=10, temperatures=[1.0])
    writer.add_shard([(1, np.array([[1, 2]]), np.array([[-0.1, -2.0]], np.float32), np.array([[-3.0]], np.float32))])
    writer.finalize({})
    assert _mode(tmp_path / "logits") == 0o777 & ~umask
    assert _mode(tmp_path / "logits" / "manifest.json") == 0o666 & ~umask
