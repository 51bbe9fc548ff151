"""Seed-aware statistics for the comparison table: pure numpy, seeded, vectorised.

Quality is a [seeds, items] matrix of per-item scores (1/0 exact match): every seed of an experiment is scored on
the same eval items. Two sources of noise make a cell move between runs: which items were drawn (shared by every
seed and every pipeline) and how training went (one draw per seed). The two-level bootstrap resamples both: each
replicate draws seeds with replacement, then items with replacement (one item draw per replicate, applied to every
seed, because the items are the same for every seed), and takes the mean.

Resampling both levels naively counts the per-item noise twice (once in the spread of the seed means, once in the
item draw) and, with few seeds, shrinks the run-to-run spread by (S-1)/S; the seed means' deviations are therefore
rescaled to the moment estimate of the training (run-to-run) variance alone before seeds are resampled
(:func:`seed_effect_scale`). benchmarks/paired_test_size.py measures the false-positive rate on simulated nulls.

The paired comparison with the baseline uses the same scheme on the per-(seed, item) differences, which is where the
pairing pays: item difficulty cancels. Its p-value inverts the percentile interval (two-sided), so "p < 1 -
confidence" and "the interval excludes 0" always agree, and the verdict reads off the interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BETTER, SAME, WORSE = "better", "no detectable difference", "worse"
# replicates per vectorised block: bounds the [block, seeds, items] temporary at ~32 MB of float64
_BLOCK_ELEMENTS = 4_000_000


def _as_matrix(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [seeds, items] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("scores contain NaN or inf: drop missing seeds/items before the bootstrap")
    return x


def _check(n_boot: int, confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {n_boot}")


def seed_effect_scale(x: np.ndarray) -> float:
    """Factor for the seed means' deviations so that plain resampling of seeds has the variance of the run-to-run
    (training) component alone, estimated by moments: var(seed means) = sigma_run^2 + sigma_resid^2 / items, with
    sigma_resid^2 from the seed x item residuals. The item draw of the bootstrap supplies the item and residual
    parts, so they are not counted twice; the factor also undoes plain resampling's (S-1)/S shrinkage."""
    n_seeds, n_items = x.shape
    if n_seeds < 2:
        return 0.0
    seed_means = x.mean(axis=1)
    s2_means = seed_means.var(ddof=1)
    if s2_means <= 0:
        return 0.0
    resid = x - seed_means[:, None] - x.mean(axis=0)[None, :] + x.mean()
    s2_resid = float((resid ** 2).sum() / ((n_seeds - 1) * max(n_items - 1, 1))) if n_items > 1 else 0.0
    run_var = max(0.0, s2_means - s2_resid / n_items)
    return math.sqrt(run_var / ((n_seeds - 1) / n_seeds * s2_means))


def bootstrap_means(scores, n_boot: int = 2000, seed: int = 0, inflate: bool = True) -> np.ndarray:
    """The two-level bootstrap distribution of the grand mean of a [seeds, items] score matrix (n_boot values).

    ``inflate`` (default): rescale the seed means' deviations by :func:`seed_effect_scale` before resampling seeds;
    False: plain resampling of the rows as they are."""
    x = _as_matrix(scores)
    n_seeds, n_items = x.shape
    if inflate and n_seeds > 1:
        seed_means = x.mean(axis=1, keepdims=True)
        x = x + (seed_effect_scale(x) - 1.0) * (seed_means - seed_means.mean())
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    block = max(1, _BLOCK_ELEMENTS // (n_seeds * n_items))
    for start in range(0, n_boot, block):
        b = min(n_boot, start + block) - start
        seeds = rng.integers(0, n_seeds, size=(b, n_seeds))
        items = rng.integers(0, n_items, size=(b, n_items))
        out[start:start + b] = x[seeds[:, :, None], items[:, None, :]].mean(axis=(1, 2))
    return out


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci_low: float
    ci_high: float
    n_seeds: int
    n_items: int


def two_level_ci(scores, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of a [seeds, items] matrix with a percentile CI from the two-level bootstrap (seeds, then items),
    inside the range of the scores (a score in [0, 1] never gets an interval reaching below 0 or above 1)."""
    _check(n_boot, confidence)
    x = _as_matrix(scores)
    dist = bootstrap_means(x, n_boot, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(dist, [alpha, 1 - alpha])
    # the rescaled seed deviations can step outside the scores' range (e.g. below 0 % near the floor): clip to it
    low, high = max(float(low), float(x.min())), min(float(high), float(x.max()))
    return Estimate(float(x.mean()), low, high, x.shape[0], x.shape[1])


@dataclass(frozen=True)
class PairedResult:
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    n_seeds: int
    n_items: int


def paired_comparison(pipeline, baseline, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> PairedResult:
    """Δ = pipeline − baseline over matched (seed, item) pairs: mean, two-level bootstrap CI, two-sided p-value,
    verdict (better / no detectable difference / worse at ``confidence``)."""
    _check(n_boot, confidence)
    a, b = _as_matrix(pipeline), _as_matrix(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs matched seeds and items: {a.shape} vs {b.shape}")
    d = a - b
    dist = bootstrap_means(d, n_boot, seed)
    alpha = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(dist, [alpha, 1 - alpha]))
    delta = float(d.mean())
    if not d.any():
        p = 1.0
    else:
        p = float(min(1.0, 2 * min((dist <= 0).mean(), (dist >= 0).mean())))
    verdict = BETTER if low > 0 else WORSE if high < 0 else SAME
    return PairedResult(delta, low, high, p, verdict, d.shape[0], d.shape[1])


def mean_spread(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values; (nan, nan) if none."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def item_ci(values, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of one run's per-item scores (always inside the scores' range, e.g. [0, 1])."""
    est = two_level_ci(np.asarray(values, dtype=np.float64)[None, :], n_boot, confidence, seed)
    return est.ci_low, est.ci_high
