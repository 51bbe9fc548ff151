"""Logit cache: id packing, bit-exact round trips, checksums, disk check, teacher pass, int8 effect on the loss."""
import json
import os

import numpy as np
import pytest
import torch

from distill_bench.kd import cache as cache_mod
from distill_bench.kd.cache import (CacheError, CacheReader, CacheWriter, bytes_per_position, decode_ids,
                                    decode_ids_bitwise, encode_ids, encode_values, id_encoding_for, id_row_bytes,
                                    loss_positions)
from distill_bench.kd.loss import kd_loss
from distill_bench.kd.stage import _topk_rows, build_cache
from toy_kd import tiny_llama, tiny_tokenizer, toy_encoded

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _random_rows(rng, n, k, vocab, temps=1):
    ids = np.array([rng.choice(vocab, size=k, replace=False) for _ in range(n)], dtype=np.int64).reshape(n, k)
    vals = -np.sort(rng.gamma(2.0, 2.0, size=(n, k)).astype(np.float32), axis=1)
    tail = rng.normal(-3, 1, size=(n, temps)).astype(np.float32)
    return ids, vals, tail


def _write(tmp_path, value_dtype="float16", vocab=320, k=8, n_shards=2, per_shard=3, seed=0, temps=(1.0,)):
    rng = np.random.default_rng(seed)
    w = CacheWriter(tmp_path / "cache", k=k, value_dtype=value_dtype, vocab_size=vocab, temperatures=list(temps))
    rows = []
    for _ in range(n_shards):
        shard = []
        for j in range(per_shard):
            n = int(rng.integers(0, 6)) if j else 4
            shard.append((int(rng.integers(0, 2**63)), *_random_rows(rng, n, k, vocab, len(temps))))
        rows += shard
        w.add_shard(shard)
    manifest = w.finalize({"tokenizer_vocab_hash": "h"})
    return tmp_path / "cache", manifest, rows


def test_packed_17bit_ids_round_trip_for_100k_vocab():
    vocab = 100_278
    assert id_encoding_for(vocab) == "packed17" and id_encoding_for(65536) == "uint16"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(50, 64))
    ids[0, :3] = [0, vocab - 1, 2**17 - 1 if 2**17 - 1 < vocab else vocab - 1]
    raw = encode_ids(ids, "packed17")
    assert raw.shape == (50, id_row_bytes("packed17", 64)) == (50, 136)
    assert np.array_equal(decode_ids(raw, "packed17", 64), ids)


def test_fp16_uint16_cache_round_trip_is_bit_exact(tmp_path):
    d, manifest, rows = _write(tmp_path)
    reader = CacheReader(d)
    assert manifest["n_examples"] == 6 and manifest["id_encoding"] == "uint16"
    for i, (h, ids, vals, tail) in enumerate(rows):
        raw = reader.get_raw(i)
        assert raw["ids"].dtype == np.dtype("<u2") and raw["values"].dtype == np.dtype("<f2")
        assert np.array_equal(raw["ids"], ids.astype(np.uint16))
        assert raw["values"].tobytes() == vals.astype(np.float16).tobytes()
        assert raw["tail"].tobytes() == tail.tobytes()
        e = reader.get(i)
        assert np.array_equal(e.ids, ids) and np.array_equal(e.values, vals.astype(np.float16).astype(np.float32))
        assert reader.example_hash(i) == h


@pytest.mark.parametrize("bits", [17, 18, 20, 24, 25, 26, 31, 32])
@pytest.mark.parametrize("k", [1, 3, 7, 8, 64, 100])
def test_packed_ids_of_every_width_and_k_round_trip_through_either_decoder(bits, k):
    """Up to 25 bits the decoder reads each id as a shifted 32-bit word; above, it unpacks bits: both exact, the
    largest id of the width included."""
    rng = np.random.default_rng(bits * 1000 + k)
    ids = rng.integers(0, 2**bits, size=(9, k), dtype=np.int64)
    ids[0, 0], ids[-1, -1] = 2**bits - 1, 0
    raw = encode_ids(ids, f"packed{bits}")
    assert raw.shape == (9, id_row_bytes(f"packed{bits}", k))
    assert np.array_equal(decode_ids(raw, f"packed{bits}", k), ids)
    assert np.array_equal(decode_ids_bitwise(raw, bits, k), ids)
    assert decode_ids(raw[:0], f"packed{bits}", k).shape == (0, k)


def test_packed_ids_and_bfloat16_cache_round_trip_is_bit_exact(tmp_path):
    d, manifest, rows = _write(tmp_path, value_dtype="bfloat16", vocab=100_000, k=5)
    reader = CacheReader(d)
    assert manifest["id_encoding"] == "packed17"
    for i, (_, ids, vals, _) in enumerate(rows):
        e = reader.get(i)
        assert np.array_equal(e.ids, ids)
        ref = torch.from_numpy(vals).to(torch.bfloat16).float().numpy()
        assert e.values.tobytes() == ref.tobytes()


def test_corrupted_shard_is_refused_naming_the_shard(tmp_path):
    d, manifest, _ = _write(tmp_path)
    name = manifest["shards"][1]["files"]["values"]
    data = bytearray((d / name).read_bytes())
    data[-1] ^= 0xFF
    (d / name).write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"shard 1 is corrupted.*{name}"):
        CacheReader(d)


def test_missing_shard_is_refused_naming_the_shard(tmp_path):
    d, manifest, _ = _write(tmp_path)
    name = manifest["shards"][0]["files"]["ids"]
    (d / name).unlink()
    with pytest.raises(CacheError, match=rf"shard 0 is missing its ids file '{name}'"):
        CacheReader(d)


def test_manifest_missing_or_wrong_version_is_refused(tmp_path):
    d, _, _ = _write(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="format_version"):
        CacheReader(d)
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(tmp_path / "nowhere")


def test_bytes_per_position_layout():
    assert bytes_per_position(64, "float16", 320) == 64 * 4 + 4           # 4 B/entry + float32 tail
    assert bytes_per_position(64, "int8", 320) == 64 * 3 + 4 + 4          # + fp16 offset/scale
    assert bytes_per_position(64, "float16", 100_278) == 64 * 2 + 136 + 4  # 17-bit ids


@pytest.fixture(scope="module")
def toy():
    tok = tiny_tokenizer()
    enc = toy_encoded(tok, 10)
    enc[3] = None                                                          # a dropped (too long) example
    model = tiny_llama(len(tok), seed=1)
    return tok, enc, model


def test_disk_too_small_is_refused_before_the_teacher_pass(tmp_path, toy, monkeypatch):
    tok, enc, model = toy
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(CacheError, match="not enough disk space"):
        build_cache(model, enc, tmp_path / "c", k=8, value_dtype="float16", temperatures=[1.0], batch_size=4,
                    pad_token_id=tok.pad_token_id)
    assert not calls and not (tmp_path / "c").exists()


def test_teacher_pass_caches_exactly_the_loss_positions(tmp_path, toy):
    tok, enc, model = toy
    manifest, stats = build_cache(model, enc, tmp_path / "c", k=8, value_dtype="float16", temperatures=[1.0, 2.0],
                                  batch_size=3, pad_token_id=tok.pad_token_id, n_shards=3)
    reader = CacheReader(tmp_path / "c")
    kept = [e for e in enc if e is not None]
    assert stats["cached_positions"] == manifest["n_positions"] == sum(len(loss_positions(e["completion_mask"]))
                                                                        for e in kept)
    assert stats["input_tokens"] == sum(len(e["input_ids"]) for e in kept)   # pads never counted
    assert len(manifest["shards"]) == 3 and reader.n_positions(3) == 0
    model.eval()
    for i in (0, 5, 9):
        ex = enc[i]
        with torch.no_grad():
            logits = model(torch.tensor([ex["input_ids"]])).logits[0]
        pos = loss_positions(ex["completion_mask"]) - 1
        ids, vals, tails = _topk_rows(logits[pos], 8, [1.0, 2.0])
        e = reader.get(i)
        assert np.array_equal(e.ids, ids.numpy())            # batched + head-only path == single full forward
        assert np.allclose(e.values, vals.numpy(), atol=2e-3)
        assert np.allclose(e.tail, tails.numpy(), atol=1e-4)


def test_int8_values_change_the_kd_loss_by_under_one_percent(tmp_path):
    g = torch.Generator().manual_seed(0)
    vocab, n, k = 320, 400, 64
    # a peaked, LM-like teacher (the trained-teacher case) and a student that is not yet close to it
    teacher = torch.randn(n, vocab, generator=g) * 4 + torch.randn(1, vocab, generator=g) * 2
    student = torch.randn(1, n + 1, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (1, n + 1), generator=g)
    ids, vals, tails = _topk_rows(teacher, k, [1.0])
    losses = {}
    for dtype in ("float16", "int8"):
        enc = encode_values(vals.numpy(), dtype)
        deq = torch.from_numpy(cache_mod.decode_values(enc, dtype))
        losses[dtype] = kd_loss(student, labels, ids.long(), deq, tails[:, 0], alpha=0.5, temperature=1.0)[0].item()
        kl_only = kd_loss(student, labels, ids.long(), deq, tails[:, 0], alpha=0.0, temperature=1.0)[0].item()
        losses[dtype + "_kl"] = kl_only
    assert abs(losses["int8"] - losses["float16"]) / losses["float16"] < 0.01
    assert abs(losses["int8_kl"] - losses["float16_kl"]) / losses["float16_kl"] < 0.01
    assert bytes_per_position(k, "int8", vocab) - 8 == 3 * k     # 3 B per kept entry


def test_tail_artifact_equals_the_tail_a_cache_built_at_that_temperature_holds(tmp_path, toy):
    """Adding a temperature computes only its tail column: a [1.0] cache plus a tau = 2 tail artifact reads the same
    rows as a cache built with [1.0, 2.0] in one pass."""
    from distill_bench.kd.stage import build_tail

    tok, enc, model = toy
    build_cache(model, enc, tmp_path / "both", k=8, value_dtype="float16", temperatures=[1.0, 2.0], batch_size=3,
                pad_token_id=tok.pad_token_id, n_shards=3)
    build_cache(model, enc, tmp_path / "base", k=8, value_dtype="float16", temperatures=[1.0], batch_size=3,
                pad_token_id=tok.pad_token_id, n_shards=3)
    manifest, stats = build_tail(model, enc, tmp_path / "base", tmp_path / "tau2", temperature=2.0, batch_size=3,
                                 pad_token_id=tok.pad_token_id)
    assert manifest["temperature"] == 2.0 and stats["tail_positions"] > 0
    both = CacheReader(tmp_path / "both")
    joined = CacheReader(tmp_path / "base", tail_dirs=[tmp_path / "tau2"])
    assert joined.temperatures == both.temperatures == [1.0, 2.0]
    for i in range(len(enc)):
        if enc[i] is None:
            continue
        a, b = both.get(i), joined.get(i)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.values, b.values)
        assert np.allclose(a.tail, b.tail, atol=1e-5), i


def test_tail_artifact_built_on_another_cache_is_refused(tmp_path, toy):
    from distill_bench.kd.cache import CacheMismatchError
    from distill_bench.kd.stage import build_tail

    tok, enc, model = toy
    build_cache(model, enc, tmp_path / "k8", k=8, value_dtype="float16", temperatures=[1.0], batch_size=3,
                pad_token_id=tok.pad_token_id)
    build_cache(model, enc, tmp_path / "k4", k=4, value_dtype="float16", temperatures=[1.0], batch_size=3,
                pad_token_id=tok.pad_token_id)
    build_tail(model, enc, tmp_path / "k8", tmp_path / "tau2", temperature=2.0, batch_size=3,
               pad_token_id=tok.pad_token_id)
    with pytest.raises(CacheMismatchError, match="another logit cache"):
        CacheReader(tmp_path / "k4", tail_dirs=[tmp_path / "tau2"])
