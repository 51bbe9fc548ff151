"""KD loss: alpha * CE + (1 - alpha) * tau^2 * KL(p_teacher^tau || p_student^tau) over top-k + one tail bucket.

alpha weighs the cross-entropy on the ground-truth tokens (the original study's convention). Both distributions live
on the same k + 1 buckets (the teacher's top-k ids and "everything else"), so each sums to one and the KL is a true
KL (never negative, zero iff the bucketed distributions agree). With k = V the tail is empty and the loss is the exact
full-vocabulary KD loss.

Normalisation: the summed per-token loss is divided by the number of loss-bearing tokens of the *whole accumulated
batch* (the Trainer's ``num_items_in_batch``), so 1 x 8 and 2 x 4 micro-batches give the same loss and gradient.

Memory/compute: per chunk of positions the student's log-softmax over the vocabulary is computed once and serves
both CE and the KD term (at tau != 1 the KD term needs a second one, of z / tau); one gather picks the target and
top-k entries. Chunks bound the [chunk, V] temporaries, and with gradients on each chunk is recomputed in backward
(activation checkpointing) instead of keeping its [chunk, V] activations. The loss-bearing rows are gathered from
the [B, L, V] logits once and cut into chunks by one ``split``: indexing the logits per chunk would make autograd
write a zero-filled [B, L, V] gradient per chunk (hundreds at a 100k vocabulary; see docs/BENCHMARKS.md).

Compiled terms (``compiled_terms=True``; the KD trainer sets it when its decoder layers are compiled): the per-chunk
work is a chain of full-vocabulary passes (log-softmax, gather, masked scatter, logsumexp and their backward) that
eager mode runs as dozens of kernels, each reading or writing [chunk, V] float32; compiled, they fuse into a few. Same
math, a different kernel (rounded differently, like any kernel choice).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from distill_bench.train.collate import loss_positions_in

TAU_MATCH = 1e-6
DEFAULT_CHUNK_ELEMENTS = 1 << 28  # positions per chunk = this / vocab (1 GiB of float32 logits; ~2.7k positions at
                                  # V=100k). 1 << 24 (167 positions) made KD 30 % slower than SFT on an H100
                                  # (docs/BENCHMARKS.md)


class KDConfigError(ValueError):
    """The KD settings cannot be served by the cache (e.g. a temperature whose tail normaliser is not cached)."""


def tail_at_temperature(values: torch.Tensor, tail: torch.Tensor, temperatures: Sequence[float], tau: float, *,
                        vocab_size: int | None = None, approximate: bool = False) -> tuple[torch.Tensor, str]:
    """Teacher tail logit log sum_{tail} exp(l_j / tau) for every position: exact when tau was cached.

    Otherwise (``approximate=True``) the midpoint of two bounds that hold for any tail of m = V - k logits all below
    the smallest kept log-prob l_k, given only the tau = 1 tail t1 (beta = 1/tau):
      A = t1 + (beta - 1) * l_k                     (all tail mass at l_k)
      B = beta * t1 + (1 - beta) * log m            (tail mass spread evenly: power-mean inequality)
    The true value lies between A and B, so the error is at most |1 - beta| * (l_k + log m - t1) / 2 (see
    :func:`tail_approximation_bound`). Returns (tail [N], mode) with mode 'exact' or 'approximate'.
    """
    for t_index, t in enumerate(temperatures):
        if abs(float(t) - float(tau)) <= TAU_MATCH:
            return tail[:, t_index], "exact"
    if not approximate:
        raise KDConfigError(
            f"kd.temperature={tau} has no cached tail normaliser (the cache holds temperatures {list(temperatures)}); "
            "add it to kd.cache_temperatures and rebuild the cache, or set kd.tail_approximation: true to use the "
            "bounded approximation documented in docs/KD.md")
    if vocab_size is None:
        raise ValueError("the tail approximation needs vocab_size")
    lo, hi = _tail_bounds(values, tail[:, 0], tau, vocab_size)
    return torch.where(torch.isneginf(hi), hi, 0.5 * (lo + hi)), "approximate"


def _tail_bounds(values: torch.Tensor, t1: torch.Tensor, tau: float, vocab_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    beta = 1.0 / float(tau)
    m = int(vocab_size) - values.shape[-1]
    if m <= 0:
        empty = torch.full_like(t1, -math.inf)
        return empty, empty
    l_k = values.min(dim=-1).values
    a = t1 + (beta - 1.0) * l_k
    b = beta * t1 + (1.0 - beta) * math.log(m)
    return torch.minimum(a, b), torch.maximum(a, b)


def tail_approximation_bound(values: torch.Tensor, t1: torch.Tensor, tau: float, vocab_size: int) -> torch.Tensor:
    """Worst-case absolute error (nats) of the approximated tail logit at ``tau``, per position."""
    lo, hi = _tail_bounds(values, t1, tau, vocab_size)
    return torch.where(torch.isneginf(hi), torch.zeros_like(hi), 0.5 * (hi - lo))


def teacher_bucket_log_probs(values: torch.Tensor, tail_tau: torch.Tensor, tau: float,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, k + 1] teacher log-probs at tau over (top-k, tail), computed in ``dtype`` (the loss's compute dtype, so a
    float64 loss is float64 on the teacher side too); normalised by construction."""
    a = torch.cat([values.to(dtype) / float(tau), tail_tau.to(dtype)[:, None]], dim=1)
    return a - torch.logsumexp(a, dim=1, keepdim=True)


def _chunk_terms(z: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, t_p: torch.Tensor,
                 t_negent: torch.Tensor, tau: float, alpha: float,
                 compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = z.to(compute_dtype)                                       # [c, V] student logits of c positions
    logq1 = torch.log_softmax(z, dim=-1)                          # the one full-vocab pass at tau = 1
    if tau == 1.0:
        logq_tau = logq1
        g = logq1.gather(1, torch.cat([targets[:, None], ids], dim=1))
        ce, logq_top = -g[:, 0], g[:, 1:]
    else:
        ce = -logq1.gather(1, targets[:, None]).squeeze(1)
        logq_tau = torch.log_softmax(z / tau, dim=-1)
        logq_top = logq_tau.gather(1, ids)
    # the student's tail log-mass directly: a logsumexp over the ids outside the top-k. 1 - sum(top-k) would lose
    # every digit when the student is sharp (tail ~1e-8 is below float32's resolution near 1). The top-k entries are
    # masked with a large finite negative (not -inf), so an empty tail (k = V) stays finite with zero gradient; its
    # teacher tail is 0 and contributes nothing.
    masked = logq_tau.scatter(1, ids, torch.finfo(compute_dtype).min / 4)
    log_tail = torch.logsumexp(masked, dim=-1)
    logq = torch.cat([logq_top, log_tail[:, None]], dim=1)
    kl = t_negent - (t_p * logq).sum(dim=1)                       # sum_b p_b (log p_b - log q_b)
    total = (alpha * ce + (1.0 - alpha) * tau * tau * kl).sum()
    return total, ce.detach().sum(), kl.detach().sum()


@functools.cache
def compiled_chunk_terms() -> Callable:
    """``_chunk_terms`` compiled once per process, with dynamic shapes (the number of loss positions changes every
    batch, so a static graph would recompile each step)."""
    return torch.compile(_chunk_terms, dynamic=True)


def kd_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor, teacher_values: torch.Tensor,
            teacher_tail: torch.Tensor, *, alpha: float, temperature: float,
            num_items_in_batch: int | torch.Tensor | None = None, chunk_size: int | None = None,
            compute_dtype: torch.dtype = torch.float32, positions: tuple[torch.Tensor, ...] | None = None,
            ids_checked: bool = False, compiled_terms: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed KD loss over the loss-bearing positions of ``labels`` divided by ``num_items_in_batch``.

    ``logits`` [B, L, V] predicts ``labels`` [B, L] shifted by one (HF causal-LM convention, -100 = ignored), or
    [N, V]: the loss-bearing rows already, in order (the trainer's head on loss positions), with ``positions``
    giving their targets; then no gather copies them and no scatter writes their gradient back.
    ``teacher_*`` hold one row per loss-bearing position in row-major order of ``labels[:, 1:] != -100``:
    ids [N, k] int64, values [N, k] log-probs at tau = 1, tail [N] the tail logit at ``temperature`` (see
    :func:`tail_at_temperature`). Returns (loss, stats): ce_sum and kl_sum (detached tensors, no host sync) and n_tokens of this micro-batch.
    ``positions`` = (rows, cols, targets) of the loss-bearing positions, when the caller has them (then ``labels`` is
    not read; the trainer's come from the collator, so no host synchronisation); ``ids_checked`` = the caller made
    sure every teacher id is below the logits' size (else one host read per call checks it). ``compiled_terms`` =
    run the per-chunk terms through :func:`compiled_chunk_terms`.
    """
    alpha, tau = float(alpha), float(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise KDConfigError(f"kd.alpha={alpha} must lie in [0, 1] (alpha weighs CE)")
    if tau <= 0:
        raise KDConfigError(f"kd.temperature={tau} must be positive")
    rows, cols, targets = loss_positions_in(labels) if positions is None else positions
    n = int(targets.numel())
    if teacher_ids.shape[0] != n or teacher_values.shape != teacher_ids.shape or teacher_tail.shape != (n,):
        raise ValueError(f"teacher rows do not match the batch: {n} loss-bearing positions, teacher ids "
                         f"{tuple(teacher_ids.shape)}, values {tuple(teacher_values.shape)}, tail "
                         f"{tuple(teacher_tail.shape)}")
    vocab = logits.shape[-1]
    if n and not ids_checked and int(teacher_ids.max()) >= vocab:
        raise KDConfigError(f"cached teacher id {int(teacher_ids.max())} is outside the student's vocabulary "
                            f"({vocab} logits): teacher and student vocabularies differ")
    denom = n if num_items_in_batch is None else num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(device=logits.device, dtype=compute_dtype)
    else:   # a device fill, not a (blocking) copy of a host value
        denom = torch.full((), float(denom), device=logits.device, dtype=compute_dtype)
    denom = denom.clamp(min=1)
    if n == 0:
        zero = logits.new_zeros((), dtype=compute_dtype)
        return logits.sum() * 0.0, {"ce_sum": zero, "kl_sum": zero, "n_tokens": 0}
    with torch.no_grad():
        t_logp = teacher_bucket_log_probs(teacher_values, teacher_tail, tau, compute_dtype)
        t_p = t_logp.exp()
        t_negent = torch.where(t_p > 0, t_p * t_logp, torch.zeros_like(t_p)).sum(dim=1)   # 0 log 0 = 0
    chunk = int(chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // vocab))
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad and n > chunk
    total = logits.new_zeros((), dtype=compute_dtype)
    ce_sum = logits.new_zeros((), dtype=compute_dtype)
    kl_sum = logits.new_zeros((), dtype=compute_dtype)
    # [n, V]: the rows as given, or one gather (one scatter in backward)
    z_all = logits if logits.dim() == 2 else logits[rows, cols]
    terms = compiled_chunk_terms() if compiled_terms else _chunk_terms
    for s, z in zip(range(0, n, chunk), z_all.split(chunk)):
        e = min(n, s + chunk)
        args = (z, targets[s:e], teacher_ids[s:e], t_p[s:e], t_negent[s:e], tau, alpha, compute_dtype)
        if use_ckpt:
            part, ce_c, kl_c = checkpoint(terms, *args, use_reentrant=False)
        else:
            part, ce_c, kl_c = terms(*args)
        total = total + part
        ce_sum = ce_sum + ce_c
        kl_sum = kl_sum + kl_c
    return total / denom, {"ce_sum": ce_sum, "kl_sum": kl_sum, "n_tokens": n}
