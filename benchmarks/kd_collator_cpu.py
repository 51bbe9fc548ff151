#!/usr/bin/env python
"""The KD collator's host time per batch, at the study's vocabulary and a GPU batch: what the training thread spends
laying out a batch and decoding its teacher rows when the DataLoader has no workers.

    python benchmarks/kd_collator_cpu.py [--batch 4] [--vocab 100352] [--k 64] [--out benchmarks/results/DIR]
    python benchmarks/kd_collator_cpu.py --quick          # small sizes (tests/test_benchmarks.py)

A random cache (bf16 values, packed ids) of examples 256-2,048 tokens long, the second half trained, laid out
padding-free with lengths rounded to 64 (the GPU defaults). Prints per batch: the whole KD collator, its teacher
rows, the student layout alone (what SFT's collator does), and the id decoder against the bit-by-bit one.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_bench.kd.cache import (CacheWriter, _packed_bits, decode_ids, decode_ids_bitwise,  # noqa: E402
                                    encode_ids, example_hash, id_encoding_for, loss_positions)
from distill_bench.kd.trainer import KDCollator  # noqa: E402
from distill_bench.train.collate import LMCollator  # noqa: E402


def per_call_ms(fn, calls, reps: int) -> float:
    for c in calls:
        fn(c)
    t = time.perf_counter()
    for _ in range(reps):
        for c in calls:
            fn(c)
    return (time.perf_counter() - t) / (reps * len(calls)) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=100352)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    lo, hi = (32, 128) if a.quick else (256, 2048)
    n_examples, reps = (8, 1) if a.quick else (a.examples, a.reps)
    rng = np.random.default_rng(0)
    features, entries = [], []
    for i in range(n_examples):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(7, a.vocab, size=length).tolist()
        mask = [0] * (length // 2) + [1] * (length - length // 2)
        n = len(loss_positions(mask))
        logp = np.ascontiguousarray(np.sort(-5 * rng.random((n, a.k), dtype=np.float32), axis=1)[:, ::-1])
        entries.append((example_hash(ids, mask), rng.integers(0, a.vocab, size=(n, a.k)), logp,
                        -rng.random((n, 1), dtype=np.float32)))
        features.append({"input_ids": ids, "completion_mask": mask, "example_index": i})
    with tempfile.TemporaryDirectory() as tmp:
        writer = CacheWriter(Path(tmp) / "cache", k=a.k, value_dtype="bfloat16", vocab_size=a.vocab,
                             temperatures=[1.0])
        writer.add_shard(entries)
        writer.finalize({"teacher": "random"})
        kd = KDCollator(str(Path(tmp) / "cache"), pad_token_id=0, top_k=a.k, temperature=1.0)
        lm = LMCollator(0, padding_free=True, pad_to_multiple_of=64)
        kd.padding_free, kd.pad_to_multiple_of = True, 64
        batches = [features[i:i + a.batch] for i in range(0, n_examples - a.batch + 1, a.batch)]
        raws = [np.concatenate([kd.reader.get_raw(f["example_index"])["ids"] for f in b]) for b in batches]
        res = {"batch": a.batch, "vocab": a.vocab, "k": a.k, "id_encoding": id_encoding_for(a.vocab),
               "positions_per_batch": float(np.mean([r.shape[0] for r in raws])),
               "kd_collator_ms": per_call_ms(kd, batches, reps),
               "teacher_rows_ms": per_call_ms(kd.teacher_rows, batches, reps),
               "student_layout_ms": per_call_ms(lm, batches, reps)}
        encoding = res["id_encoding"]
        res["decode_ids_ms"] = per_call_ms(lambda r: decode_ids(r, encoding, a.k), raws, reps)
        if encoding != "uint16":
            bits = _packed_bits(encoding)
            res["decode_ids_bitwise_ms"] = per_call_ms(lambda r: decode_ids_bitwise(r, bits, a.k), raws, reps)
            assert all(np.array_equal(decode_ids(r, encoding, a.k), decode_ids_bitwise(r, bits, a.k)) for r in raws)
        assert encode_ids(decode_ids(raws[0], encoding, a.k), encoding).tobytes() == raws[0].tobytes()
    print(f"batch {a.batch}, vocab {a.vocab} ({res['id_encoding']}), k {a.k}, "
          f"{res['positions_per_batch']:.0f} loss positions per batch")
    print("measure | ms per batch")
    print("---|---")
    for key in ("kd_collator_ms", "teacher_rows_ms", "student_layout_ms", "decode_ids_ms", "decode_ids_bitwise_ms"):
        if key in res:
            print(f"{key[:-3]} | {res[key]:.2f}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "kd_collator_cpu.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
