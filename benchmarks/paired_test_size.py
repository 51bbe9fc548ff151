"""Size and power of the paired seed-and-item comparison (distill_bench.report.stats) on simulated runs.

Each simulated experiment: items with a difficulty (logit), each training seed a run effect (logit), per-item
Bernoulli correctness. Under the null the pipeline and the baseline share every distribution (independent runs);
under the alternative the pipeline's logit is shifted by ``--effect``. Prints the share of "better" and "worse"
verdicts, which at confidence 0.95 should be about 2.5 % each under the null (5 % two-sided).

    python benchmarks/paired_test_size.py                 # 400 simulations per setting, ~1 min on 2 cores
    python benchmarks/paired_test_size.py --quick         # 60 simulations (smoke test)
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from distill_bench.report.stats import BETTER, WORSE, paired_comparison


def simulate_scores(rng, n_seeds: int, n_items: int, base_logit: float, seed_sd: float, shift: float,
                    difficulty: np.ndarray) -> np.ndarray:
    run = rng.normal(0.0, seed_sd, size=(n_seeds, 1))
    p = 1.0 / (1.0 + np.exp(-(base_logit + difficulty[None, :] + run + shift)))
    return (rng.random((n_seeds, n_items)) < p).astype(np.float64)


def rates(n_sims: int, n_seeds: int, n_items: int, seed_sd: float, effect: float, n_boot: int,
          base_logit: float = -1.4, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    better = worse = 0
    for sim in range(n_sims):
        difficulty = rng.normal(0.0, 1.5, size=n_items)
        base = simulate_scores(rng, n_seeds, n_items, base_logit, seed_sd, 0.0, difficulty)
        pipe = simulate_scores(rng, n_seeds, n_items, base_logit, seed_sd, effect, difficulty)
        verdict = paired_comparison(pipe, base, n_boot=n_boot, confidence=0.95, seed=sim).verdict
        better += verdict == BETTER
        worse += verdict == WORSE
    return better / n_sims, worse / n_sims, (better + worse) / n_sims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sims", type=int, default=400)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_sims = 60 if args.quick else args.sims
    print(f"{n_sims} simulations per row, {args.items} items, {args.boot} bootstrap replicates, confidence 0.95")
    print("| seeds | seed sd (logit) | effect (logit) | 'better' | 'worse' | any verdict | s |")
    print("|---|---|---|---|---|---|---|")
    for n_seeds, seed_sd, effect in [(3, 0.0, 0.0), (3, 0.25, 0.0), (3, 0.5, 0.0), (5, 0.25, 0.0),
                                     (3, 0.25, 0.8), (3, 0.25, 0.4)]:
        t0 = time.perf_counter()
        b, w, any_ = rates(n_sims, n_seeds, args.items, seed_sd, effect, args.boot)
        print(f"| {n_seeds} | {seed_sd} | {effect} | {100 * b:.1f} % | {100 * w:.1f} % | {100 * any_:.1f} % | "
              f"{time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
    main()
