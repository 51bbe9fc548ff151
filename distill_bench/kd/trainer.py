"""KD on TRL's SFTTrainer: a collator that attaches cached teacher rows, and a trainer whose loss is the KD loss.

`kd_trainer_parts` is what the train stage calls: it refuses a cache built for another tokenizer, a smaller k, another
value dtype, another corpus, or a temperature it cannot serve exactly (unless kd.tail_approximation is set).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from distill_bench.defaults import section_defaults
from distill_bench.kd.cache import (CacheMismatchError, CacheReader, decode_ids, decode_values, example_hash,
                                    loss_positions)
from distill_bench.kd.loss import KDConfigError, kd_loss, tail_at_temperature
from distill_bench.train.collate import LMCollator, loss_positions_of, model_inputs
from distill_bench.train.head import add_positions_head
from distill_bench.train.speed import layers_compiled
from distill_bench.models.tokenizer import vocab_hash
from distill_bench.models.vocab import vocabulary_hash

log = logging.getLogger(__name__)

KD_KEYS = ("kd_ids", "kd_values", "kd_tail")


class KDCollator(LMCollator):
    """Lays out a batch (padded, or padding-free) and adds the cached teacher rows of every loss-bearing position.

    Features need ``input_ids``, ``completion_mask`` and ``example_index`` (the row of the dataset's train split the
    cache was built from). An example with fewer loss positions than cached (the budget's truncated last example)
    uses the first n cached rows. The memory-mapped reader opens lazily, once per DataLoader worker.
    """

    def __init__(self, cache_dir: str, *, pad_token_id: int, top_k: int, temperature: float,
                 approximate_tail: bool = False, tail_dirs: Sequence[str] = ()):
        super().__init__(pad_token_id)   # train_student sets padding_free and pad_to_multiple_of from training.*
        self.cache_dir = str(cache_dir)
        self.tail_dirs = [str(d) for d in tail_dirs]
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self.approximate_tail = bool(approximate_tail)
        self._reader: CacheReader | None = None

    def __getstate__(self):  # DataLoader workers re-open the memmaps themselves
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:
            self._reader = CacheReader(self.cache_dir, verify=False, tail_dirs=self.tail_dirs)
        return self._reader

    def teacher_rows(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        reader = self.reader
        raws = []
        for f in features:
            if "example_index" not in f:
                raise KeyError("KD collator: feature without 'example_index' (the train stage must keep that column)")
            n = len(loss_positions(f["completion_mask"]))
            raws.append(reader.get_raw(int(f["example_index"]), n))
        raw = {role: np.concatenate([r[role] for r in raws]) for role in raws[0]}
        ids = decode_ids(raw["ids"], reader.id_encoding, reader.k)
        values = decode_values(raw, reader.value_dtype)
        tail = torch.from_numpy(np.asarray(raw["tail"], dtype=np.float32))
        ids_t, values_t = torch.from_numpy(ids), torch.from_numpy(values)
        if self.top_k < reader.k:
            # fold the dropped entries into the tail bucket: exact at every cached temperature
            extra = values_t[:, self.top_k:]
            temps = torch.tensor(reader.temperatures, dtype=torch.float32)
            folded = torch.logsumexp(extra[:, :, None] / temps[None, None, :], dim=1)
            tail = torch.logaddexp(tail, folded)
            ids_t, values_t = ids_t[:, :self.top_k].contiguous(), values_t[:, :self.top_k].contiguous()
        tail_tau, _ = tail_at_temperature(values_t, tail, reader.temperatures, self.temperature,
                                          vocab_size=int(reader.manifest["vocab_size"]),
                                          approximate=self.approximate_tail)
        return {"kd_ids": ids_t, "kd_values": values_t, "kd_tail": tail_tau.contiguous()}

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The student's layout (padded or padding-free, LMCollator) plus the teacher rows of the loss positions in
        row-major order, which both layouts keep."""
        return {**super().__call__(features), **self.teacher_rows(features)}


class _TrainTimer(TrainerCallback):
    def __init__(self, trainer: "KDSFTTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.kd_timing["train_start"] = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        t = self.trainer.kd_timing
        t["train_s"] = time.perf_counter() - t.get("train_start", time.perf_counter())


class KDSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is :func:`distill_bench.kd.loss.kd_loss`; records time spent waiting for data.

    The loss is normalised by ``num_items_in_batch`` (the loss-bearing tokens of the whole accumulated batch), so the
    Trainer must not divide it by the accumulation steps again: ``loss_is_scaled_for_ga = True``.
    """

    loss_is_scaled_for_ga = True
    kd_head_on_loss_positions: bool = True   # head on loss rows only (add_positions_head): +1.9 % tok/s, -0.9 GiB (H100)
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0
    kd_chunk_size: int | None = None
    # None = compile the KD loss's per-chunk terms when the decoder layers are compiled (training.torch_compile layers,
    # or auto on a GPU): the loss alone then takes about half its eager GPU time (docs/BENCHMARKS.md)
    kd_compile_loss: bool | None = None

    def __init__(self, *args, kd_alpha: float | None = None, kd_temperature: float | None = None,
                 kd_chunk_size: int | None = None, **kwargs):
        if kd_alpha is not None:
            self.kd_alpha = float(kd_alpha)
        if kd_temperature is not None:
            self.kd_temperature = float(kd_temperature)
        if kd_chunk_size is not None:
            self.kd_chunk_size = int(kd_chunk_size)
        self.kd_timing: dict[str, float] = {"data_wait_s": 0.0, "batches": 0}
        super().__init__(*args, **kwargs)
        self.add_callback(_TrainTimer(self))
        self._kd_sums: list[torch.Tensor] = []
        self._kd_head = bool(self.kd_head_on_loss_positions) and add_positions_head(self.model)
        self._ids_checked = self._cache_fits_student()
        self.kd_loss_compiled = bool(layers_compiled(self.model) if self.kd_compile_loss is None
                                     else self.kd_compile_loss)

    def _cache_fits_student(self) -> bool:
        """Checked once here instead of per step (a host read of the ids' max): every cached id is below the
        cache's vocabulary size, so a cache no larger than the student's logits fits. False = kd_loss checks every
        batch (e.g. a teacher whose embedding is padded to more rows than the student's, same tokenizer)."""
        reader = getattr(self.data_collator, "reader", None)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if reader is None or head is None:
            return False
        return int(reader.manifest["vocab_size"]) <= int(head.weight.shape[0])

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in ("completion_mask", "example_index"):   # the collator needs them even with remove_unused_columns
            if col not in self._signature_columns:
                self._signature_columns = list(self._signature_columns) + [col]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        out = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.kd_timing["data_wait_s"] += time.perf_counter() - start
        self.kd_timing["batches"] += len(out[0])
        return out

    def data_wait_fraction(self) -> float | None:
        """Share of training wall time spent waiting for the next batches (None before training ran)."""
        t = self.kd_timing
        total = t.get("train_s") or (time.perf_counter() - t["train_start"] if "train_start" in t else None)
        return None if not total else t["data_wait_s"] / total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        teacher = {k: inputs.pop(k) for k in KD_KEYS}
        for extra in ("completion_mask", "example_index"):
            inputs.pop(extra, None)
        rows, cols, targets = loss_positions_of({"labels": labels, **inputs})
        if self._kd_head and not return_outputs:
            # logits of the loss-bearing rows only, [n, V]: row i predicts targets[i] (same loss)
            logits = model(**model_inputs(inputs), kd_rows=rows, kd_cols=cols)
            labels, positions, outputs = None, (rows, cols, targets), None
        else:
            outputs = model(**model_inputs(inputs), use_cache=False)
            logits, positions = outputs.logits, (rows, cols, targets)
        loss, stats = kd_loss(logits, labels, teacher["kd_ids"], teacher["kd_values"], teacher["kd_tail"],
                              alpha=self.kd_alpha, temperature=self.kd_temperature,
                              num_items_in_batch=num_items_in_batch, chunk_size=self.kd_chunk_size,
                              positions=positions, ids_checked=self._ids_checked,
                              compiled_terms=self.kd_loss_compiled)
        if num_items_in_batch is None and model.training:
            # local mean; the Trainer will not divide by the accumulation steps (loss_is_scaled_for_ga), so we do
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        elif num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes   # DDP averages gradients; num_items counts all ranks
        mode = "train" if model.training else "eval"
        if stats["n_tokens"]:
            # the count as a device fill: a host value copied to the GPU (torch.as_tensor) would be a blocking copy,
            # which waits for the forward and the loss to finish before the backward can be queued
            count = torch.full((), float(stats["n_tokens"]), device=loss.device, dtype=stats["ce_sum"].dtype)
            self._kd_sums.append(torch.stack([stats["ce_sum"], stats["kl_sum"], count]))
        self._kd_mode = mode
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._kd_sums:
            ce, kl, n = torch.stack(self._kd_sums).sum(0).tolist()
            self._kd_sums = []
            prefix = "eval_" if getattr(self, "_kd_mode", "train") == "eval" else ""
            logs[f"{prefix}kd_ce"] = ce / max(n, 1)
            logs[f"{prefix}kd_kl"] = kl / max(n, 1)
        frac = self.data_wait_fraction()
        if frac is not None:
            logs["data_wait_fraction"] = frac
        super().log(logs, start_time)


def make_kd_trainer_cls(*, alpha: float, temperature: float, chunk_size: int | None = None) -> type:
    """A KDSFTTrainer subclass with the KD settings bound, so the train stage can construct it like SFTTrainer."""
    return type("KDSFTTrainer", (KDSFTTrainer,), {"kd_alpha": float(alpha), "kd_temperature": float(temperature),
                                                  "kd_chunk_size": chunk_size, "__module__": __name__})


def check_cache_vocabulary(manifest: Mapping[str, Any], tokenizer, cache_dir: str) -> str:
    """Refuse a cache whose teacher tokenizer maps ids to other tokens than the student's (naming both).

    Compared: the token -> id map (models/vocab.py), special tokens included; a cache written before that hash was
    recorded falls back to the stricter tokenizer-identity hash."""
    if manifest.get("tokenizer_vocabulary_hash"):
        teacher_hash, student_hash, what = manifest["tokenizer_vocabulary_hash"], vocabulary_hash(tokenizer), \
            "vocabulary hash"
    else:
        teacher_hash, student_hash, what = manifest.get("tokenizer_vocab_hash"), vocab_hash(tokenizer), "vocab hash"
    if teacher_hash != student_hash:
        raise CacheMismatchError(
            f"logit KD needs one vocabulary: the cache {cache_dir!r} was built by teacher {manifest.get('teacher')!r} "
            f"with tokenizer {manifest.get('tokenizer')!r} ({what} {str(teacher_hash)[:12]}), the student uses "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} ({what} {student_hash[:12]}); use a teacher/student pair "
            f"of one vocabulary, or the text pipelines (sft, dpo) across vocabularies")
    return student_hash


def kd_trainer_parts(cache_dir: str, kd: Mapping[str, Any], tokenizer, examples: Sequence[Mapping[str, Any]],
                     tail_dirs: Sequence[str] = ()) -> tuple[type, KDCollator, dict[str, Any]]:
    """(trainer_cls, collator, extra_info) for a KD student; validates cache vs tokenizer, kd settings and corpus.
    ``tail_dirs``: per-temperature tail artifacts built on the cache (the workflow passes the student's tau)."""
    reader = CacheReader(cache_dir, verify=True, tail_dirs=tail_dirs)
    m = reader.manifest
    check_cache_vocabulary(m, tokenizer, cache_dir)
    top_k = int(kd.get("top_k", m["k"]))
    if not 1 <= top_k <= int(m["k"]):
        raise CacheMismatchError(f"kd.top_k={top_k} but the cache {cache_dir!r} holds k={m['k']}; rebuild it "
                                 "with a larger k")
    value_dtype = kd.get("value_dtype", m["value_dtype"])
    if value_dtype != m["value_dtype"]:
        raise CacheMismatchError(f"kd.value_dtype={value_dtype!r} but the cache {cache_dir!r} stores "
                                 f"{m['value_dtype']!r}; rebuild it")
    defaults = section_defaults("kd")   # top_k and value_dtype default to the cache's own instead
    alpha = float(kd.get("alpha", defaults["alpha"]))
    if not 0.0 <= alpha <= 1.0:
        raise KDConfigError(f"kd.alpha={alpha} must lie in [0, 1] (alpha weighs CE)")
    tau = float(kd.get("temperature", defaults["temperature"]))
    approximate = bool(kd.get("tail_approximation", defaults["tail_approximation"]))
    exact = any(abs(tau - t) <= 1e-6 for t in reader.temperatures)
    if not exact and not approximate:
        raise KDConfigError(
            f"kd.temperature={tau}: the cache {cache_dir!r} holds tail normalisers for {reader.temperatures} only; "
            "build its tail artifact (the cache_tail stage) or list it in kd.cache_temperatures and rebuild, or set "
            "kd.tail_approximation: true (bounded, docs/KD.md)")
    checked = truncated = 0
    for pos, ex in enumerate(examples):
        if "example_index" not in ex:
            raise KeyError(f"KD example {pos}: no 'example_index' (row of the dataset's train split)")
        idx = int(ex["example_index"])
        n = len(loss_positions(ex["completion_mask"]))
        cached = reader.n_positions(idx)
        if n > cached:
            raise CacheMismatchError(f"KD example {pos} (example_index {idx}) has {n} loss positions, the cache "
                                     f"{cache_dir!r} has {cached}: the corpus or max_length differs; rebuild it")
        if n == cached:
            if example_hash(ex["input_ids"], ex["completion_mask"]) != reader.example_hash(idx):
                raise CacheMismatchError(f"KD example {pos} (example_index {idx}) differs from the example the "
                                         f"teacher saw when building {cache_dir!r}: rebuild the cache")
            checked += 1
        else:
            truncated += 1
    collator = KDCollator(cache_dir, pad_token_id=tokenizer.pad_token_id, top_k=top_k, temperature=tau,
                          approximate_tail=approximate and not exact, tail_dirs=tail_dirs)
    trainer_cls = make_kd_trainer_cls(alpha=alpha, temperature=tau, chunk_size=kd.get("chunk_size", defaults["chunk_size"]))
    info = {"kd_cache": str(cache_dir), "kd_tail_artifacts": [str(d) for d in tail_dirs], "kd_teacher": m.get("teacher"), "kd_cache_k": int(m["k"]),
            "kd_top_k": top_k, "kd_value_dtype": m["value_dtype"], "kd_alpha": alpha, "kd_temperature": tau,
            "kd_tail_mode": "exact" if exact else "approximate", "kd_cache_positions": int(m["n_positions"]),
            "kd_cache_bytes_per_position": int(m["bytes_per_position"]), "kd_examples_hash_checked": checked,
            "kd_examples_truncated": truncated}
    return trainer_cls, collator, info
