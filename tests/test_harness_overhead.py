"""Harness overhead: the time from a stage process's start to its meter opening is recorded in the stage JSON, and
resolving a stage module stays free of torch (the import happens inside the meter, where it is measured)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stage_json_records_time_from_process_start_to_meter(tmp_path):
    # a process that spends 0.6 s before handing a stage to its meter (as imports would) records at least that
    code = textwrap.dedent(f"""
        import time
        time.sleep(0.6)
        from distill_bench import stages
        stages.resolve = lambda name: (lambda meter: {{"ok": True}})
        stages.run_named_stage("prepare_tokenizer", out_json={str(tmp_path / "s.json")!r},
                               meter_args={{"stage_id": "t", "role": "setup", "energy": {{"codecarbon": False}}}},
                               kwargs={{}})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    record = json.loads((tmp_path / "s.json").read_text())
    overhead = record["metrics"]["harness_overhead_s"]
    assert 0.6 <= overhead < 60


def test_resolving_training_and_caching_stages_imports_no_torch():
    code = ("import sys; from distill_bench.stages import resolve; "
            "[resolve(n) for n in ('train_student', 'cache_logits', 'generate_synthetic', 'evaluate', "
            "'prepare_tokenizer')]; import distill_bench.train, distill_bench.forecast; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout.strip()
    assert out == "[]"
