"""Preference distillation (issue 7): sample candidates, judge them into pairs, train with TRL ``DPOTrainer``.

Stages (keyword-only, plus ``meter``): ``stage.sample_candidates`` and ``stage.judge_candidates`` (role teacher),
``stage.precompute_reference`` (optional, role student), ``train.train_dpo`` (role student).
Pure helpers: ``pairs.build_pairs``, ``judges.parse_judge_score``, ``config.normalize_dpo``.
"""
