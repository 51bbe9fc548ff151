"""The short table that ends benchmarks/gpu_perf_session.sh: each step's exit code and time, then the headline
numbers of every JSON the steps wrote (multi-GPU runs, optimizer variants, generation).

    python benchmarks/perf_session_summary.py WORK_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v, spec: str = "{:,.0f}", scale: float = 1.0) -> str:
    return spec.format(v * scale) if isinstance(v, (int, float)) else "-"


def summarise(work: Path) -> str:
    lines = ["step | rc | seconds | limit", "---|---|---|---"]
    steps = work / "steps.tsv"
    if steps.is_file():
        for row in steps.read_text().splitlines()[1:]:
            lines.append(" | ".join(row.split("\t")))
    multi = _load(work / "multi" / "multi_gpu.json")
    if multi:
        lines += ["", f"multi-GPU ({multi.get('device')} x {multi.get('gpus')}, {multi.get('distributed')}):",
                  "run | status | B params | steady input tok/s | MFU | peak GiB | stage s | GPU J | wrapper",
                  "---|---|---|---|---|---|---|---|---"]
        for r in multi.get("runs", []):
            if "skipped" in r or "error" in r:
                lines.append(f"{r['run']} | {(r.get('skipped') or r.get('error'))[:160]} |||||||")
                continue
            s = r.get("speed") or {}
            lines.append(" | ".join([r["run"], str(r.get("status")), _fmt(r["model"]["parameters"], "{:.2f}", 1e-9),
                                     _fmt(s.get("input_tokens_per_s")), _fmt(r.get("mfu"), "{:.1f} %", 100),
                                     _fmt(s.get("peak_memory_gib_max_rank"), "{:.1f}"),
                                     _fmt(r.get("stage_duration_s"), "{:.1f}"), _fmt(r.get("gpu_j")),
                                     str(s.get("wrapper"))]))
        lc = multi.get("losscheck")
        if lc and lc.get("max_rel_diff") is not None:
            lines.append(f"loss check: {lc['steps']} steps, max / mean relative difference "
                         f"{lc['max_rel_diff']:.2e} / {lc['mean_rel_diff']:.2e}")
    trainer = _load(work / "trainer" / "trainer_runs.json")
    if trainer:
        lines += ["", "1B trainer (batch as run):", "variant | tok/s | MFU | step s | J/tok | note",
                  "---|---|---|---|---|---"]
        for r in trainer.get("runs", []):
            note = r.get("skipped") or r.get("error") or ""
            lines.append(" | ".join([r["variant"], _fmt(r.get("tokens_per_s")), _fmt(r.get("mfu"), "{:.1f} %", 100),
                                     _fmt(r.get("step_s"), "{:.3f}"), _fmt(r.get("j_per_token"), "{:.4f}"),
                                     note[:120]]))
    gen = _load(work / "generation" / "gpu_generation.json")
    if gen:
        lines += ["", "generation:", "shape | variant | tok/s | J/tok | decode % roofline | % prefill+decode ideal | "
                  "prefill s", "---|---|---|---|---|---|---"]
        for shape, body in (gen.get("shapes") or {}).items():
            for r in body.get("runs", []):
                lines.append(" | ".join([shape, r.get("variant", "?"), _fmt(r.get("tokens_per_s")),
                                         _fmt(r.get("j_per_token"), "{:.3f}"),
                                         _fmt(r.get("decode_fraction_of_roofline"), "{:.1f}", 100),
                                         _fmt(r.get("fraction_of_prefill_plus_decode_roofline"), "{:.1f}", 100),
                                         _fmt(r.get("prefill_s"), "{:.2f}")]
                                        + ([r["error"][:120]] if r.get("error") else [])))
    for path in sorted((work / "cache").glob("caching_*.json")):
        cache = _load(path)
        if not cache:
            continue
        lines += ["", f"logit cache, {cache.get('shape')} teacher, k = {cache.get('k')}:",
                  "run | kind | s | input tok/s | GPU J | J/position", "---|---|---|---|---|---"]
        for r in cache.get("runs", []):
            lines.append(" | ".join([str(r.get("order")), r.get("kind", "?"), _fmt(r.get("time_s"), "{:.1f}"),
                                     _fmt(r.get("input_tokens_per_s")), _fmt(r.get("gpu_j")),
                                     _fmt(r.get("j_per_cached_position"), "{:.4f}")]))
        lines.append(f"cache / bare forward: {_fmt(cache.get('fraction_of_bare'), '{:.1f} %', 100)} (target "
                     f"{_fmt(cache.get('target'), '{:.0f} %', 100)}); {cache.get('bytes_per_position')} B/position "
                     f"(study ~{cache.get('study_bytes_per_position')})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1])))
