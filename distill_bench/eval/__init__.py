"""Evaluation: GSM8K-style answer extraction + exact match (identical to lm-eval's gsm8k), bootstrap CI, the native
evaluator on the shared batched generation path, and the lm-evaluation-harness backend."""
from distill_bench.eval.scoring import (bootstrap_ci, exact_match, extract_flexible, extract_strict, normalize,
                                        score)

__all__ = ["bootstrap_ci", "exact_match", "extract_flexible", "extract_strict", "normalize", "score"]
