"""Our GSM8K scorer must agree with lm-eval's own gsm8k filters and exact_match metric, output for output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from distill_bench.eval.scoring import bootstrap_ci, exact_match, extract_flexible, extract_strict, score

# (model output, gold) -- gold is either a bare answer or a full worked solution ending in '#### N'
CASES = [
    ("The total is 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,234", "1234"),                                   # thousands separator
    ("He pays $5 in total.\n#### $5", "5"),                   # dollar sign inside strict
    ("So the answer is $5.", "5"),                            # $ + trailing period, flexible only
    ("The answer is 42.", "42"),                              # trailing period
    ("First 12, then 30, finally 18", "18"),                  # several numbers, last one wins
    ("no hash marks here, answer 99", "99"),                  # no ####
    ("#### -3", "-3"),                                        # negative
    ("It drops to -12 degrees", "-12"),                       # negative, flexible
    ("#### 7 and then more text 8", "7"),                     # strict takes 7, flexible takes 8
    ("#### 7\nextra line 8.", "Step one.\n#### 7"),           # gold as a worked solution
    ("I don't know", "5"),                                    # nothing to extract
    ("", "0"),                                                # empty output
    ("#### 3.50", "3.50"),
    ("#### 1,000.", "1000"),                                  # comma and trailing period in strict
    ("value 5 and 6", "6"),                                   # single digits via the second group
    ("Answer: 0.5", "0.5"),
    ("#### 12\n#### 13", "12"),                               # strict takes the first ####
    ("total $1,200.00 so #### 1200", "1200"),
    ("3 apples", "3"),
    ("#### abc", "abc"),                                      # strict pattern needs digits
    ("The result: 1.2.3", "1.2.3"),
]


def _lm_eval_gsm8k():
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_metric
    from lm_eval.filters import build_filter_ensemble

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    ensembles = [build_filter_ensemble(f["name"], [(c["function"], {k: v for k, v in c.items() if k != "function"})
                                                   for c in f["filter"]]) for f in cfg["filter_list"]]
    (metric_cfg,) = [m for m in cfg["metric_list"] if m["metric"] == "exact_match"]
    kwargs = {k: v for k, v in metric_cfg.items() if k not in ("metric", "aggregation", "higher_is_better")}
    metric = get_metric("exact_match")
    instances = [Instance("generate_until", {"answer": gold}, ("q", {}), 0, ("gsm8k", i, 1), resps=[out])
                 for i, (out, gold) in enumerate(CASES)]
    scores = {}
    for ens in ensembles:
        ens.apply(instances)
        scores[ens.name] = [metric(references=[gold], predictions=[inst.filtered_resps[ens.name]], **kwargs)
                            ["exact_match"] for inst, (_, gold) in zip(instances, CASES)]
    extracted = {name: [inst.filtered_resps[name] for inst in instances] for name in scores}
    return scores, extracted


def test_strict_and_flexible_scores_match_lm_eval_gsm8k_pipeline_item_by_item():
    theirs, extracted = _lm_eval_gsm8k()
    ours_strict = [float(exact_match(extract_strict(o), g)) for o, g in CASES]
    ours_flex = [float(exact_match(extract_flexible(o), g)) for o, g in CASES]
    assert ours_strict == [float(x) for x in theirs["strict-match"]]
    assert ours_flex == [float(x) for x in theirs["flexible-extract"]]
    # the extracted strings agree too (None is lm-eval's '[invalid]' fallback)
    assert [extract_strict(o) or "[invalid]" for o, _ in CASES] == extracted["strict-match"]
    assert [extract_flexible(o) or "[invalid]" for o, _ in CASES] == extracted["flexible-extract"]
    # and the case set is not degenerate: both extractors get some right and some wrong, and they disagree
    assert 0 < sum(ours_strict) < len(CASES) and 0 < sum(ours_flex) < len(CASES) and ours_strict != ours_flex
    agg = score([o for o, _ in CASES], [g for _, g in CASES], n_boot=200)
    assert agg["strict"]["acc"] == pytest.approx(np.mean(theirs["strict-match"]))
    assert agg["flexible"]["acc"] == pytest.approx(np.mean(theirs["flexible-extract"]))


def test_tricky_extractions_by_hand():
    assert extract_strict("#### 7 and then more text 8") == "7"
    assert extract_flexible("#### 7 and then more text 8") == "8"
    assert extract_strict("the answer is 5") is None
    assert extract_flexible("So the answer is $5.") == "$5."
    assert exact_match("$5.", "5") and exact_match("1,234", "1234") and not exact_match(None, "5")


def test_bootstrap_ci_contains_point_estimate_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.6).astype(float)
    large = (rng.random(2000) < 0.6).astype(float)
    lo_s, hi_s = bootstrap_ci(small, 500, 0.95, seed=1)
    lo_l, hi_l = bootstrap_ci(large, 500, 0.95, seed=1)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3
    assert bootstrap_ci(small, 500, 0.95, seed=1) == (lo_s, hi_s)  # seeded -> reproducible
    assert bootstrap_ci(small, 500, 0.99, seed=1)[1] - bootstrap_ci(small, 500, 0.99, seed=1)[0] > hi_s - lo_s


def test_bootstrap_ci_rejects_empty_and_bad_confidence():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([], 100, 0.95, 0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 0.0], 100, 1.5, 0)
