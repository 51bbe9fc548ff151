"""Top-k teacher logit cache: sharded, memory-mappable arrays plus a manifest (format described in docs/KD.md).

Per loss-bearing position (label index i with completion_mask[i] == 1, teacher logits taken at position i-1) we keep:

* ``ids``    the teacher's top-k token ids (uint16 when the vocabulary fits, else bit-packed ceil(log2 V)-bit ids);
* ``values`` their log-probabilities at tau = 1, l_i = z_i - LSE(z) (float16 / bfloat16, or 8-bit companded with a
  per-position offset and scale); softmax is shift-invariant, so these are the raw logits up to one constant;
* ``tail``   float32, one per cached temperature: log sum_{j not in top-k} exp(l_j / tau) -- what is needed to
  renormalise the top-k plus one tail bucket *exactly* at that tau (for tau = 1 it is the log tail mass).

Why not store LSE(z) and derive the rest? The tail at tau != 1 is not a function of LSE(z); storing it per cached
tau is 4 bytes and exact, where any one-number approximation has a bound of several nats at tau = 2.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from distill_bench.atomic import atomic_write_json, make_temp_dir, replace_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALUE_DTYPES = ("float16", "bfloat16", "int8")
# int8 mode: d = offset - l in [0, scale]; code = round(255 * sqrt(d / scale)) -- fine steps near the top-1 entry,
# where the probability mass (and so the KL's sensitivity) is.
INT8_LEVELS = 255


class CacheError(RuntimeError):
    """The cache on disk is missing, corrupted, or does not match what the caller needs."""


class CacheMismatchError(CacheError):
    """A valid cache that was built for another tokenizer, k, corpus or dtype than the one asked for."""


# ----------------------------------------------------------------------------------------------------------------- ids

def id_bits(vocab_size: int) -> int:
    """Bits needed for ids in [0, vocab_size)."""
    return max(1, int(math.ceil(math.log2(max(int(vocab_size), 2)))))


def id_encoding_for(vocab_size: int) -> str:
    """'uint16' when the vocabulary fits 16 bits, else 'packed<b>' with b = ceil(log2 V) (17 for OLMo-2's 100k)."""
    if int(vocab_size) <= 1 << 16:
        return "uint16"
    bits = id_bits(vocab_size)
    if bits > 32:
        raise ValueError(f"vocab_size={vocab_size} needs {bits}-bit ids; at most 32 are supported")
    return f"packed{bits}"


def _packed_bits(encoding: str) -> int:
    if not encoding.startswith("packed"):
        raise ValueError(f"not a packed id encoding: {encoding!r}")
    return int(encoding[len("packed"):])


def id_row_bytes(encoding: str, k: int) -> int:
    """Bytes one position's k ids take on disk."""
    if encoding == "uint16":
        return 2 * k
    return (k * _packed_bits(encoding) + 7) // 8


def encode_ids(ids: np.ndarray, encoding: str) -> np.ndarray:
    """[P, k] integer ids -> on-disk array ([P, k] uint16, or [P, row_bytes] uint8 little-endian bit-packed rows)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [positions, k], got shape {ids.shape}")
    if ids.size and (ids.min() < 0):
        raise ValueError("negative token id in teacher top-k ids")
    if encoding == "uint16":
        if ids.size and ids.max() > 0xFFFF:
            raise ValueError(f"token id {int(ids.max())} does not fit uint16")
        return ids.astype("<u2")
    bits = _packed_bits(encoding)
    if ids.size and ids.max() >= (1 << bits):
        raise ValueError(f"token id {int(ids.max())} does not fit {bits} bits")
    p, k = ids.shape
    as_bytes = ids.astype("<u4").reshape(p, k, 1).view(np.uint8)  # [P, k, 4] little-endian
    bitplanes = np.unpackbits(as_bytes, axis=2, bitorder="little")[:, :, :bits]  # [P, k, bits]
    return np.packbits(bitplanes.reshape(p, k * bits), axis=1, bitorder="little")  # [P, ceil(k*bits/8)]


def decode_ids(raw: np.ndarray, encoding: str, k: int) -> np.ndarray:
    """Inverse of :func:`encode_ids`; returns int64 [P, k].

    Packed ids of up to 25 bits are read as words: id j starts at bit j*b, so the four bytes from byte (j*b)//8 hold
    it whole, shifted by (j*b) % 8 <= 7 bits. One gather per byte of the word instead of unpacking every bit
    (benchmarks/kd_collator_cpu.py: ~5x faster; with no DataLoader workers this runs on the training thread)."""
    raw = np.asarray(raw)
    if encoding == "uint16":
        return raw.astype(np.int64)
    bits = _packed_bits(encoding)
    if bits + 7 > 32:
        return decode_ids_bitwise(raw, bits, k)
    start = np.arange(k, dtype=np.int64) * bits
    byte, shift = start // 8, (start % 8).astype(np.uint32)
    padded = np.zeros((raw.shape[0], raw.shape[1] + 3), dtype=np.uint8)   # the last id's word may run past the row
    padded[:, :raw.shape[1]] = raw
    word = padded[:, byte].astype(np.uint32)
    for i in (1, 2, 3):
        word |= padded[:, byte + i].astype(np.uint32) << np.uint32(8 * i)
    return ((word >> shift) & np.uint32((1 << bits) - 1)).astype(np.int64)


def decode_ids_bitwise(raw: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Packed ids of any width by unpacking every bit (ids wider than 25 bits, and the reference for the others)."""
    p = raw.shape[0]
    bitplanes = np.unpackbits(raw, axis=1, count=k * bits, bitorder="little").reshape(p, k, bits)
    padded = np.zeros((p, k, 32), dtype=np.uint8)
    padded[:, :, :bits] = bitplanes
    return np.packbits(padded, axis=2, bitorder="little").view("<u4").reshape(p, k).astype(np.int64)


# -------------------------------------------------------------------------------------------------------------- values

def value_entry_bytes(value_dtype: str) -> int:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"kd.value_dtype={value_dtype!r}; use one of {list(VALUE_DTYPES)}")
    return 1 if value_dtype == "int8" else 2


def bytes_per_position(k: int, value_dtype: str, vocab_size: int, n_temperatures: int = 1) -> int:
    """Exact on-disk bytes per cached position: k values + k ids + float32 tail per tau (+ 4 B int8 offset/scale)."""
    b = k * value_entry_bytes(value_dtype) + id_row_bytes(id_encoding_for(vocab_size), k) + 4 * n_temperatures
    return b + (4 if value_dtype == "int8" else 0)


def encode_values(logp: np.ndarray, value_dtype: str) -> dict[str, np.ndarray]:
    """float32 [P, k] teacher log-probs (sorted descending per row) -> on-disk arrays for ``value_dtype``."""
    logp = np.asarray(logp, dtype=np.float32)
    if value_dtype == "float16":
        return {"values": logp.astype("<f2")}
    if value_dtype == "bfloat16":
        import torch

        return {"values": torch.from_numpy(np.ascontiguousarray(logp)).to(torch.bfloat16).view(torch.int16)
                .numpy().view("<u2")}
    if value_dtype == "int8":
        offset = logp.max(axis=1).astype("<f2")                     # top-1 log-prob (fp16), d = 0 there
        off32 = offset.astype(np.float32)[:, None]
        d = np.maximum(off32 - logp, 0.0)
        scale = d.max(axis=1).astype("<f2")
        scale32 = scale.astype(np.float32)
        # the fp16-rounded scale may sit just below the true max: clip so the code stays in range
        scale32 = np.where(scale32 > 0, scale32, 1.0)[:, None]
        code = np.rint(np.sqrt(np.clip(d / scale32, 0.0, 1.0)) * INT8_LEVELS).astype(np.uint8)
        return {"values": code, "qparams": np.stack([offset, scale], axis=1)}
    raise ValueError(f"kd.value_dtype={value_dtype!r}; use one of {list(VALUE_DTYPES)}")


def decode_values(arrays: Mapping[str, np.ndarray], value_dtype: str) -> np.ndarray:
    """On-disk value arrays -> float32 [P, k] log-probs at tau = 1."""
    raw = np.asarray(arrays["values"])
    if value_dtype == "float16":
        return raw.astype(np.float32)
    if value_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if value_dtype == "int8":
        q = np.asarray(arrays["qparams"]).astype(np.float32)
        u = raw.astype(np.float32) / INT8_LEVELS
        return q[:, :1] - q[:, 1:2] * u * u
    raise ValueError(f"kd.value_dtype={value_dtype!r}; use one of {list(VALUE_DTYPES)}")


# ------------------------------------------------------------------------------------------------------------- hashing

def example_hash(input_ids: Sequence[int], completion_mask: Sequence[int]) -> int:
    """64-bit fingerprint of one encoded example (so a student's example can be matched to its cached rows)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(input_ids, dtype="<i4").tobytes())
    h.update(np.asarray(completion_mask, dtype=np.uint8).tobytes())
    return int.from_bytes(h.digest(), "little")


def corpus_hash(encoded: Sequence[Mapping[str, Any] | None]) -> str:
    """sha256 over the encoded corpus in example order (dropped examples included as markers)."""
    h = hashlib.sha256()
    for i, ex in enumerate(encoded):
        h.update(i.to_bytes(8, "little"))
        if ex is None:
            h.update(b"\x00dropped")
            continue
        h.update(len(ex["input_ids"]).to_bytes(4, "little"))
        h.update(np.asarray(ex["input_ids"], dtype="<i4").tobytes())
        h.update(np.asarray(ex["completion_mask"], dtype=np.uint8).tobytes())
    return h.hexdigest()


def loss_positions(completion_mask: Sequence[int]) -> np.ndarray:
    """Label indices i >= 1 with completion_mask[i] == 1 (the teacher is read at i - 1)."""
    m = np.asarray(completion_mask, dtype=bool)
    idx = np.nonzero(m)[0]
    return idx[idx >= 1]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------------- disk check

def estimate_cache_bytes(n_positions: int, n_examples: int, *, k: int, value_dtype: str, vocab_size: int,
                         n_temperatures: int = 1) -> int:
    """On-disk size of a cache before it is written (positions x bytes/position + per-example index + slack)."""
    return (int(n_positions) * bytes_per_position(k, value_dtype, vocab_size, n_temperatures)
            + 16 * int(n_examples) + (1 << 16))


def check_disk_space(out_dir: str | os.PathLike, needed_bytes: int, what: str = "KD logit cache") -> int:
    """Fail before any teacher forward pass when the filesystem holding ``out_dir`` cannot take the cache."""
    probe = Path(out_dir).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(needed_bytes * 1.02) + (1 << 20)
    if free < need:
        raise CacheError(f"not enough disk space for the {what} at {str(out_dir)!r}: it needs about "
                         f"{need / 2**20:.1f} MiB, the filesystem of {str(probe)!r} has {free / 2**20:.1f} MiB free")
    return free


# -------------------------------------------------------------------------------------------------------------- writer

def _shard_files(index: int, value_dtype: str) -> dict[str, str]:
    roles = ["offsets", "hashes", "ids", "values", "tail"] + (["qparams"] if value_dtype == "int8" else [])
    return {role: f"shard-{index:05d}.{role}.npy" for role in roles}


class CacheWriter:
    """Writes shards into a temporary sibling directory; :meth:`finalize` renames it onto ``out_dir``."""

    def __init__(self, out_dir: str | os.PathLike, *, k: int, value_dtype: str, vocab_size: int,
                 temperatures: Sequence[float]):
        value_entry_bytes(value_dtype)
        temps = [float(t) for t in temperatures]
        if not temps or temps[0] != 1.0 or any(t <= 0 for t in temps) or len(set(temps)) != len(temps):
            raise ValueError(f"cache temperatures must start with 1.0, be positive and distinct, got {temps}")
        self.out = Path(out_dir)
        self.k, self.value_dtype, self.vocab_size = int(k), value_dtype, int(vocab_size)
        self.temperatures = temps
        self.id_encoding = id_encoding_for(vocab_size)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_temp_dir(f".{self.out.name}.tmp-", self.out.parent)
        self.shards: list[dict[str, Any]] = []
        self.next_example = 0

    def add_shard(self, examples: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray] | None]) -> dict[str, Any]:
        """One shard of consecutive examples: each (example_hash, ids [n,k], logp [n,k], tail [n,T]) or None."""
        n_t = len(self.temperatures)
        counts = [0 if e is None else int(e[1].shape[0]) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype="<i8")
        np.cumsum(counts, out=offsets[1:])
        hashes = np.array([0 if e is None else e[0] for e in examples], dtype="<u8")
        present = [e for e in examples if e is not None and e[1].shape[0]]
        ids = np.concatenate([e[1] for e in present]) if present else np.zeros((0, self.k), np.int64)
        logp = np.concatenate([e[2] for e in present]) if present else np.zeros((0, self.k), np.float32)
        tail = np.concatenate([e[3] for e in present]) if present else np.zeros((0, n_t), np.float32)
        if ids.shape[1:] != (self.k,) or logp.shape != ids.shape or tail.shape != (ids.shape[0], n_t):
            raise ValueError(f"shard arrays have shapes ids {ids.shape}, values {logp.shape}, tail {tail.shape}; "
                             f"expected [P, {self.k}], [P, {self.k}], [P, {n_t}]")
        arrays = {"offsets": offsets, "hashes": hashes, "ids": encode_ids(ids, self.id_encoding),
                  "tail": tail.astype("<f4"), **encode_values(logp, self.value_dtype)}
        index = len(self.shards)
        files = _shard_files(index, self.value_dtype)
        digest = hashlib.sha256()
        total = 0
        file_hashes = {}
        for role, name in files.items():
            np.save(self.tmp / name, np.ascontiguousarray(arrays[role]), allow_pickle=False)
            file_hashes[role] = _sha256_file(self.tmp / name)
            digest.update(f"{role}:{file_hashes[role]}\n".encode())
            total += (self.tmp / name).stat().st_size
        entry = {"index": index, "first_example": self.next_example, "n_examples": len(examples),
                 "n_positions": int(offsets[-1]), "files": files, "bytes": total, "sha256": digest.hexdigest(),
                 "file_sha256": file_hashes}
        self.shards.append(entry)
        self.next_example += len(examples)
        return entry

    def finalize(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Write the manifest and atomically move the finished cache onto ``out_dir``."""
        n_pos = sum(s["n_positions"] for s in self.shards)
        data_bytes = sum(s["bytes"] for s in self.shards)
        manifest = {
            "format_version": FORMAT_VERSION,
            **dict(meta),
            "vocab_size": self.vocab_size,
            "k": self.k,
            "value_dtype": self.value_dtype,
            "value_encoding": {"float16": "log-prob at tau=1, float16", "bfloat16": "log-prob at tau=1, bfloat16",
                               "int8": "l = offset - scale*(code/255)^2; qparams=[offset, scale] float16"}[
                                   self.value_dtype],
            "id_encoding": self.id_encoding,
            "temperatures": self.temperatures,
            "tail": "float32 [P, T]: log sum_{j not in top-k} exp(l_j / tau_t) for tau_t in temperatures",
            "n_examples": self.next_example,
            "n_positions": n_pos,
            "bytes_per_position": bytes_per_position(self.k, self.value_dtype, self.vocab_size,
                                                     len(self.temperatures)),
            "data_bytes": data_bytes,
            "shards": self.shards,
        }
        atomic_write_json(self.tmp / MANIFEST, manifest, allow_nan=True)
        replace_dir(self.tmp, self.out)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------------- reader

@dataclass
class CacheEntry:
    """Cached teacher rows of one example, in loss-position order."""
    ids: np.ndarray        # int64 [n, k]
    values: np.ndarray     # float32 [n, k], teacher log-probs at tau = 1 (descending)
    tail: np.ndarray       # float32 [n, T], log tail sum at each cached temperature


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"KD logit cache {str(cache_dir)!r} has no {MANIFEST} (not built, or the build was "
                         "interrupted)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path}: corrupted manifest: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}; rebuild the cache")
    return manifest


class CacheReader:
    """Memory-mapped view of a cache. ``verify=True`` checks every shard's sha256 (names the bad shard).

    ``tail_dirs`` are per-temperature tail artifacts (:func:`write_tail_dir`) built on this cache: their tau joins
    ``temperatures`` and their column is appended to every ``tail`` row, as if the cache had been built with it.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, verify: bool = True,
                 tail_dirs: Sequence[str | os.PathLike] = ()):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        m = self.manifest
        self.k, self.value_dtype, self.id_encoding = int(m["k"]), m["value_dtype"], m["id_encoding"]
        self.temperatures = [float(t) for t in m["temperatures"]]
        self.n_examples = int(m["n_examples"])
        self._starts = np.array([s["first_example"] for s in m["shards"]], dtype=np.int64)
        for s in m["shards"]:
            for role, name in s["files"].items():
                if not (self.dir / name).is_file():
                    raise CacheError(f"KD logit cache {str(self.dir)!r}: shard {s['index']} is missing its "
                                     f"{role} file {name!r}")
        self.tails: list[tuple[Path, dict[str, Any]]] = []
        for tail_dir in tail_dirs:
            tail_manifest = read_tail_manifest(tail_dir, m)
            tau = float(tail_manifest["temperature"])
            if any(abs(tau - t) <= 1e-9 for t in self.temperatures):
                raise CacheError(f"tail artifact {str(tail_dir)!r}: temperature {tau} is already in the cache "
                                 f"{str(self.dir)!r} ({self.temperatures})")
            self.temperatures.append(tau)
            self.tails.append((Path(tail_dir), tail_manifest))
        if verify:
            self.verify()
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def verify(self) -> None:
        for s in self.manifest["shards"]:
            digest = hashlib.sha256()
            for role, name in s["files"].items():
                digest.update(f"{role}:{_sha256_file(self.dir / name)}\n".encode())
            if digest.hexdigest() != s["sha256"]:
                bad = [name for role, name in s["files"].items()
                       if _sha256_file(self.dir / name) != s.get("file_sha256", {}).get(role)]
                raise CacheError(f"KD logit cache {str(self.dir)!r}: shard {s['index']} is corrupted "
                                 f"(sha256 mismatch in {', '.join(bad) or 'its files'}); rebuild the cache")
        for tail_dir, tail_manifest in self.tails:
            for s in tail_manifest["shards"]:
                if _sha256_file(tail_dir / s["file"]) != s["sha256"]:
                    raise CacheError(f"tail artifact {str(tail_dir)!r}: {s['file']} is corrupted (sha256 mismatch); "
                                     "rebuild it")

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        arrays = self._open.get(i)
        if arrays is None:
            s = self.manifest["shards"][i]
            try:
                arrays = {role: np.load(self.dir / name, mmap_mode="r", allow_pickle=False)
                          for role, name in s["files"].items()}
            except (OSError, ValueError) as exc:
                raise CacheError(f"KD logit cache {str(self.dir)!r}: shard {i} is unreadable: {exc}") from exc
            if self.tails:
                columns = [np.asarray(arrays["tail"], dtype=np.float32)]
                for tail_dir, tail_manifest in self.tails:
                    name = tail_manifest["shards"][i]["file"]
                    try:
                        columns.append(np.load(tail_dir / name, allow_pickle=False).astype(np.float32)[:, None])
                    except (OSError, ValueError) as exc:
                        raise CacheError(f"tail artifact {str(tail_dir)!r}: {name} is unreadable: {exc}") from exc
                arrays = {**arrays, "tail": np.concatenate(columns, axis=1)}
            self._open[i] = arrays
        return arrays

    def _locate(self, example_index: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= example_index < self.n_examples:
            raise CacheError(f"example_index {example_index} is outside the KD logit cache {str(self.dir)!r} "
                             f"({self.n_examples} examples)")
        si = int(np.searchsorted(self._starts, example_index, side="right") - 1)
        return self._shard(si), example_index - int(self._starts[si])

    def n_positions(self, example_index: int) -> int:
        arrays, j = self._locate(example_index)
        return int(arrays["offsets"][j + 1] - arrays["offsets"][j])

    def example_hash(self, example_index: int) -> int:
        arrays, j = self._locate(example_index)
        return int(arrays["hashes"][j])

    def get_raw(self, example_index: int, n: int | None = None) -> dict[str, np.ndarray]:
        """On-disk rows (still encoded) of one example, optionally only its first ``n`` positions."""
        arrays, j = self._locate(example_index)
        lo, hi = int(arrays["offsets"][j]), int(arrays["offsets"][j + 1])
        if n is not None:
            if n > hi - lo:
                raise CacheError(f"example {example_index} has {hi - lo} cached positions, {n} were asked for "
                                 "(the student's example is longer than the teacher's: corpus mismatch)")
            hi = lo + n
        return {role: a[lo:hi] for role, a in arrays.items() if role not in ("offsets", "hashes")}

    def get(self, example_index: int, n: int | None = None) -> CacheEntry:
        raw = self.get_raw(example_index, n)
        return CacheEntry(ids=decode_ids(raw["ids"], self.id_encoding, self.k),
                          values=decode_values(raw, self.value_dtype),
                          tail=np.asarray(raw["tail"], dtype=np.float32))


# ------------------------------------------------------------------------------------------- per-temperature tails

TAIL_KIND = "kd_tail"


def _cache_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a tail artifact must agree with: the corpus, k, and every shard's position count and contents."""
    return {"corpus_hash": manifest.get("corpus_hash"), "k": int(manifest["k"]),
            "shards": [[int(s["n_positions"]), s["sha256"]] for s in manifest["shards"]]}


def write_tail_dir(out_dir: str | os.PathLike, cache_manifest: Mapping[str, Any], temperature: float,
                   shard_tails: Sequence[np.ndarray], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write one temperature's exact tail column for every shard of a cache, atomically.

    ``shard_tails[i]`` is float32 [n_positions of shard i]: log sum over the ids outside that position's cached
    top-k of exp(l_j / tau). Kept apart from the cache so adding a temperature to a sweep computes only this.
    """
    identity = _cache_identity(cache_manifest)
    if len(shard_tails) != len(identity["shards"]):
        raise ValueError(f"{len(shard_tails)} tail shards for a cache of {len(identity['shards'])}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        shards = []
        for i, (tail, (n_pos, _)) in enumerate(zip(shard_tails, identity["shards"])):
            tail = np.asarray(tail, dtype="<f4").reshape(-1)
            if tail.shape[0] != n_pos:
                raise ValueError(f"tail shard {i} has {tail.shape[0]} positions, the cache's has {n_pos}")
            name = f"shard-{i:05d}.tail.npy"
            np.save(tmp / name, tail, allow_pickle=False)
            shards.append({"index": i, "file": name, "n_positions": n_pos, "sha256": _sha256_file(tmp / name)})
        manifest = {**dict(meta or {}), "format_version": FORMAT_VERSION, "kind": TAIL_KIND,
                    "temperature": float(temperature),
                    "tail": "float32 [P]: log sum_{j not in the cache's top-k} exp(l_j / tau)",
                    "cache": identity, "shards": shards}
        atomic_write_json(tmp / MANIFEST, manifest, allow_nan=True)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_tail_manifest(tail_dir: str | os.PathLike, cache_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A tail artifact's manifest, refused unless it was built on exactly this cache."""
    path = Path(tail_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"tail artifact {str(tail_dir)!r} has no {MANIFEST} (not built, or interrupted)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path}: corrupted manifest: {exc}") from exc
    if manifest.get("kind") != TAIL_KIND or manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: not a format-{FORMAT_VERSION} KD tail artifact")
    if manifest.get("cache") != json.loads(json.dumps(_cache_identity(cache_manifest))):
        raise CacheMismatchError(f"tail artifact {str(tail_dir)!r} was built on another logit cache (corpus, k or "
                                 "shards differ); rebuild it")
    for s in manifest["shards"]:
        if not (Path(tail_dir) / s["file"]).is_file():
            raise CacheError(f"tail artifact {str(tail_dir)!r} is missing {s['file']!r}")
    return manifest


def iter_shard_sizes(cache_dir: str | os.PathLike) -> Iterable[tuple[str, int]]:
    """(file name, bytes) of every cache file, for the stage JSON."""
    d = Path(cache_dir)
    for s in read_manifest(d)["shards"]:
        for name in s["files"].values():
            yield name, (d / name).stat().st_size
