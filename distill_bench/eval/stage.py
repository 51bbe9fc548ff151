"""``evaluate`` stage: one model on one dataset (native) or on lm-eval task(s), dispatching on ``eval.backend``."""
from __future__ import annotations

from typing import Any, Mapping

from distill_bench.eval.common import parse_eval_config


def evaluate(*, meter, model: str, out_json: str, eval: Mapping[str, Any], model_id: str, seed: int,
             tokenizer: str | None = None, dataset: str | None = None, split: str = "eval",
             task: str | None = None) -> dict[str, Any]:
    """Write ``out_json`` (result JSON + ``<name>.samples.jsonl`` beside it). ``task`` picks one lm-eval task (the
    workflow runs one stage per (model, task)); ``task=None`` evaluates ``dataset``'s split -- natively, or with
    lm-eval through our local ``distill_arith`` task YAML. ``tokenizer=None``: the model directory's own."""
    cfg = parse_eval_config(eval)
    if cfg["backend"] == "lm_eval":
        from distill_bench.eval.lm_eval_backend import evaluate_lm_eval

        return evaluate_lm_eval(meter=meter, model=model, tokenizer=tokenizer, dataset=dataset, out_json=out_json,
                                eval=eval, model_id=model_id, seed=seed, split=split, task=task)
    if task not in (None, "native"):
        raise ValueError(f"eval.backend is native but task {task!r} was given; tasks are for eval.backend: lm_eval")
    from distill_bench.eval.native import evaluate_native

    return evaluate_native(meter=meter, model=model, tokenizer=tokenizer, dataset=dataset, out_json=out_json,
                           eval=eval, model_id=model_id, seed=seed, split=split)
