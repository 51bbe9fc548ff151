"""Seed-aware statistics: the two-level bootstrap on hand-computable cases, the paired test's size and power."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from distill_bench.report.stats import (BETTER, SAME, WORSE, bootstrap_means, item_ci, mean_spread,
                                        paired_comparison, two_level_ci)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_one_seed_two_items_gives_the_textbook_bootstrap_distribution():
    """Items [1, 0]: the resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4."""
    dist = bootstrap_means([[1.0, 0.0]], n_boot=20000, seed=3)
    for value, prob in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(np.isclose(dist, value)) == pytest.approx(prob, abs=0.015)


def test_seed_level_resampling_without_item_noise():
    """Two seeds that score every item 0 and 1: item resampling changes nothing, seed resampling gives 0 / 0.5 /
    1 with 1/4, 1/2, 1/4 (plain resampling, variance 0.125). No per-item noise (residuals 0), so the run-to-run
    variance is all of the seed means' s^2 = 0.5, and the default rescaling gives the bootstrap variance
    s^2 / S = 0.25."""
    scores = [[0.0] * 5, [1.0] * 5]
    plain = bootstrap_means(scores, n_boot=20000, seed=1, inflate=False)
    for value, prob in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(np.isclose(plain, value)) == pytest.approx(prob, abs=0.015)
    assert plain.var() == pytest.approx(0.125, rel=0.05)
    assert bootstrap_means(scores, n_boot=20000, seed=1).var() == pytest.approx(0.25, rel=0.05)


def test_pure_item_noise_adds_no_seed_component():
    """Seeds that differ only by per-item noise: the moment estimate of the run-to-run variance is ~0, so the
    bootstrap is (close to) the item bootstrap of the seed-averaged scores, not twice the item noise."""
    from distill_bench.report.stats import seed_effect_scale

    x = np.zeros((3, 4))
    x[0, 0] = x[1, 1] = x[2, 2] = 1.0   # every seed 1/4 correct, on different items: no run effect
    assert seed_effect_scale(x) == 0.0


def test_two_level_ci_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    scores = (rng.random((3, 200)) < 0.3).astype(float)
    a = two_level_ci(scores, 500, 0.95, seed=5)
    assert a == two_level_ci(scores, 500, 0.95, seed=5)
    assert a.ci_low < a.mean < a.ci_high and a.n_seeds == 3 and a.n_items == 200


def test_item_ci_stays_inside_the_unit_interval():
    """One correct item in 100: a normal interval would run below 0; the bootstrap cannot."""
    low, high = item_ci([1.0] + [0.0] * 99, 2000, 0.95, seed=0)
    assert 0.0 <= low <= 0.01 <= high <= 1.0


def test_two_level_ci_near_the_floor_stays_at_or_above_zero():
    """Seeds at 0 %, 0 % and 3 %: the rescaled seed deviations reach below 0, the interval does not."""
    x = np.zeros((3, 100))
    x[2, :3] = 1.0
    est = two_level_ci(x, 2000, 0.95, seed=0)
    assert 0.0 <= est.ci_low <= est.mean <= est.ci_high <= 1.0


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        two_level_ci([[1.0, math.nan]])


def test_paired_comparison_detects_a_clear_effect():
    """Power on a clear effect: +15 points on 200 matched items over 3 seeds is 'better' (nearly) every time."""
    rng = np.random.default_rng(1)
    verdicts = []
    for sim in range(20):
        base = (rng.random((3, 200)) < 0.20).astype(float)
        pipe = (rng.random((3, 200)) < 0.35).astype(float)
        res = paired_comparison(pipe, base, n_boot=500, seed=sim)
        verdicts.append(res.verdict)
        assert (res.verdict == BETTER) == (res.p_value < 0.05) or res.p_value == pytest.approx(0.05, abs=0.01)
    assert verdicts.count(BETTER) >= 18
    worse = paired_comparison(base, pipe, n_boot=500, seed=0)
    assert worse.verdict == WORSE and worse.delta < 0


def test_identical_runs_are_no_detectable_difference():
    scores = (np.random.default_rng(2).random((3, 100)) < 0.4).astype(float)
    res = paired_comparison(scores, scores.copy())
    assert res.verdict == SAME and res.delta == 0.0 and res.p_value == 1.0


def test_paired_comparison_needs_matched_shapes():
    with pytest.raises(ValueError, match="matched"):
        paired_comparison(np.zeros((3, 10)), np.zeros((2, 10)))


def test_mean_spread_ignores_missing_values():
    assert mean_spread([1.0, 3.0, None, math.nan]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_spread([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_spread([]))


@pytest.mark.slow
def test_paired_test_size_on_simulated_nulls():
    """Size: on 300 simulated nulls (3 seeds, 200 items, run-to-run sd 0.25 logit) the test calls 'better' in
    about 3 % and any verdict in about 7 % of them (benchmarks/paired_test_size.py prints more settings)."""
    from paired_test_size import rates

    better, worse, any_verdict = rates(n_sims=300, n_seeds=3, n_items=200, seed_sd=0.25, effect=0.0, n_boot=1000)
    assert better <= 0.06 and any_verdict <= 0.10
