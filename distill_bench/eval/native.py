"""Native evaluator: greedy generation with the shared batched backend, GSM8K strict/flexible exact match, CI."""
from __future__ import annotations

import json
import time
from typing import Any, Mapping

from distill_bench.atomic import atomic_write_json, atomic_write_text
from distill_bench.eval.common import (check_model_dir, gold_of, load_split, parse_eval_config,
                                       samples_path)
from distill_bench.eval.scoring import bootstrap_ci, per_item, stderr
from distill_bench.models.tokenizer import tokenizer_ref


def evaluate_native(*, meter, model: str, tokenizer: str | None, dataset: str | None, out_json: str, eval: Mapping[str, Any],
                    model_id: str, seed: int, split: str = "eval") -> dict[str, Any]:
    from distill_bench.generation import GenerationSettings, generate, resolve_backend, summarize
    from distill_bench.generation.prompts import load_tokenizer

    cfg = parse_eval_config(eval)
    if not dataset:
        raise ValueError("native evaluation needs a dataset (eval.backend: native scores a verifiable dataset split)")
    target = check_model_dir(model, tokenizer)
    tokenizer = tokenizer or model   # a pointer dir: load_tokenizer follows it to the configured tokenizer
    rows = load_split(dataset, split, cfg["limit"])
    tok = load_tokenizer(tokenizer)
    settings = GenerationSettings(backend="auto", batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"],
                                  temperature=0.0, seed=int(seed), hf_decode=cfg["hf_decode"],
                                  hf_prefill=cfg["hf_prefill"])
    backend = resolve_backend(settings.backend)
    if backend == "hf":
        from distill_bench.generation.hf_backend import load_model

        model_obj = load_model(model)
    else:
        model_obj = target  # vLLM loads the directory itself
    prompts = list(rows["prompt"])
    steady: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    results = generate(model_obj, tok if backend == "hf" else tokenizer_ref(tokenizer), prompts, settings,
                       on_batch=lambda n, dt: steady.append((n, dt)))
    gen_s = time.perf_counter() - t0
    stats = summarize(results)
    meter.add_tokens("generated_tokens", stats["generated_tokens"])
    meter.add_tokens("input_tokens", stats["input_tokens"])
    meter.set_primary_tokens("generated_tokens")

    golds = [gold_of(r) for r in rows]
    outputs = [r.text for r in results]
    items = per_item(outputs, golds)
    metrics = {}
    for key, name in (("strict_match", "strict"), ("flexible_extract", "flexible")):
        correct = [float(x["correct"]) for x in items[name]]
        low, high = bootstrap_ci(correct, cfg["bootstrap_samples"], cfg["confidence"], int(seed))
        metrics[key] = {"value": sum(correct) / len(correct), "ci_low": low, "ci_high": high,
                        "stderr": stderr(correct)}
        meter.record(key, metrics[key]["value"])
    for k in ("truncated_prompts", "dropped_prompts"):
        meter.record(k, stats[k])
    meter.record("eval_n", len(results))
    meter.record("generation_s", gen_s)
    # steady state: all batches but the first (which pays warm-up), when there is more than one
    tail = steady[1:] if len(steady) > 1 else steady
    if tail and sum(dt for _, dt in tail) > 0:
        meter.record("steady_generated_tokens_per_s", sum(n for n, _ in tail) / sum(dt for _, dt in tail))

    spath = samples_path(out_json)
    lines = []
    for row, res, s_item, f_item in zip(rows, results, items["strict"], items["flexible"]):
        lines.append(json.dumps({"id": row["id"], "prompt": row["prompt"], "gold": gold_of(row), "output": res.text,
                                 "strict_pred": s_item["pred"], "strict_correct": s_item["correct"],
                                 "flexible_pred": f_item["pred"], "flexible_correct": f_item["correct"],
                                 "prompt_tokens": res.prompt_tokens, "generated_tokens": res.generated_tokens,
                                 "finished": res.finished, "truncated_tokens": res.truncated_tokens,
                                 "dropped": res.dropped}))
    atomic_write_text(spath, "\n".join(lines) + "\n")
    result = {
        "model_id": model_id, "dataset": str(dataset), "split": split, "backend": "native",
        "generation_backend": backend, "n": len(results), "seed": int(seed),
        "confidence": cfg["confidence"], "bootstrap_samples": cfg["bootstrap_samples"], "ci_method": "bootstrap",
        "max_new_tokens": cfg["max_new_tokens"], "metrics": metrics,
        "tokens": {"generated_tokens": stats["generated_tokens"], "input_tokens": stats["input_tokens"]},
        "finished": stats["finished"], "truncated_prompts": stats["truncated_prompts"],
        "dropped_prompts": stats["dropped_prompts"], "samples": spath.name,
    }
    atomic_write_json(out_json, result, allow_nan=True)
    return result
