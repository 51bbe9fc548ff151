"""The energy forecast (distill_bench.forecast): arithmetic on a hand-built config and calibration, labelled
derivations, clear errors, the embedded default on CPU, and forecast vs measured in the roll-up."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from distill_bench.config import build_plan, validate_config
from distill_bench.forecast import (ForecastError, forecast_config, forecast_main, forecast_vs_measured,
                                    load_calibration, lookup_rate, named_shape, study_comparison,
                                    write_forecast_vs_measured)

ROOT = Path(__file__).resolve().parents[1]


def hand_config() -> dict:
    """One dataset, a pretrained 7B-class teacher and a 1B student (known HF ids: no files needed)."""
    return validate_config({
        "run_name": "hand", "seed": 1,
        "datasets": {"d": {"source": "tulu3", "path": "allenai/tulu-3-sft-mixture", "n_train": 100, "n_eval": 10,
                           "max_length": 400}},
        "tokenizer": {"source": "allenai/OLMo-2-1124-7B"},
        "teacher": {"source": "pretrained", "name_or_path": "allenai/OLMo-2-1124-7B"},
        "students": {"s": {"init": "pretrained", "name_or_path": "allenai/OLMo-2-0425-1B"}},
        "training": {"token_budget": 1000, "max_length": 400},
        "synthetic": {"max_new_tokens": 50, "samples_per_prompt": 2, "shards": 2},
        "eval": {"backend": "native", "max_new_tokens": 20},
        "experiments": [{"pipeline": "sft_gt", "students": ["s"], "datasets": ["d"]},
                        {"pipeline": "sft", "students": ["s"], "datasets": ["d"]},
                        {"pipeline": "kd", "students": ["s"], "datasets": ["d"]}],
    })


def hand_calibration() -> dict:
    cal = copy.deepcopy(load_calibration())
    cal["hardware"]["card"] = {"name": "test card", "matmul_tflops": 100, "hbm_tb_s": 1.0, "busy_w": 500,
                               "idle_w": 100, "host_w": 36, "startup_s": 10, "memory_gb": 1000}
    cal["entries"] = [
        {"hardware": "card", "operation": "train_sft", "shape": "olmo2-1b", "tokens_per_s": 1000, "j_per_token": 0.5,
         "kind": "measured", "date": "2026-01-01", "source": "hand"},
        {"hardware": "card", "operation": "train_kd", "shape": "olmo2-1b", "tokens_per_s": 500, "j_per_token": 1.0,
         "kind": "measured", "date": "2026-01-01", "source": "hand"},
        {"hardware": "card", "operation": "generate", "shape": "olmo2-7b", "tokens_per_s": 100, "j_per_token": 2.0,
         "kind": "measured", "date": "2026-01-01", "source": "hand"},
        {"hardware": "card", "operation": "cache_logits", "shape": "olmo2-7b", "tokens_per_s": 4000,
         "j_per_token": 0.25, "kind": "measured", "date": "2026-01-01", "source": "hand"},
    ]
    return cal


def test_forecast_arithmetic_on_a_hand_built_config():
    fc = forecast_config(hand_config(), "card", hand_calibration())
    by_id = {s.stage_id: s for s in fc.stages}
    assert set(by_id) == set(build_plan(hand_config()).all_stage_ids())
    # SFT: 1000 loss-bearing tokens x 2 input per trained = 2000 input tokens at 1000 tok/s, after 10 s start-up
    sft = by_id["student.train.sft_gt.s.d.s1"]
    assert (sft.tokens, sft.time_s, sft.kind) == (2000, 12.0, "measured")
    assert sft.gpu_kwh == pytest.approx((2000 * 0.5 + 10 * 100) / 3.6e6)   # tokens x J/token + start-up at idle
    assert sft.host_kwh == pytest.approx(12.0 * 36 / 3.6e6)
    kd = by_id["student.train.kd.s.d.s1"]
    assert kd.time_s == pytest.approx(10 + 2000 / 500) and kd.gpu_kwh == pytest.approx((2000 * 1.0 + 1000) / 3.6e6)
    # synthetic: 100 prompts x 2 samples x 50 new tokens over 2 shards = 5000 generated tokens per shard
    shards = [s for s in fc.stages if ".generate." in s.stage_id]
    assert len(shards) == 2 and all(s.tokens == 5000 and s.time_s == pytest.approx(60.0) for s in shards)
    # logit cache: 100 examples x (0.5 x max_length 400) tokens through the teacher at 4000 tok/s
    cache = next(s for s in fc.stages if s.stage_id.startswith("teacher.logits."))
    assert cache.tokens == 100 * 200 and cache.time_s == pytest.approx(10 + 20000 / 4000)
    # native eval of the teacher: 10 items x 20 new tokens at the teacher's generation rate
    ev = by_id["eval.teacher.d"] if "eval.teacher.d" in by_id else None
    assert ev is None or ev.tokens == 200
    total = fc.totals()["all"]
    assert total["kwh"] == pytest.approx(sum(s.kwh for s in fc.stages))
    assert any("input tokens = 2.0" in a for a in fc.assumptions)


def test_missing_entries_are_derived_and_labelled():
    cal = hand_calibration()
    # generation of the 1B student: no 1B entry on the card -> the 7B entry scaled by weight bytes per token
    r = lookup_rate(cal, "card", "generate", named_shape(cal, "olmo2-1b"), 200.0)
    big, small = named_shape(cal, "olmo2-7b"), named_shape(cal, "olmo2-1b")
    assert r.kind == "derived" and r.tokens_per_s == pytest.approx(100 * big.weight_bytes() / small.weight_bytes())
    assert any("weight bytes" in b for b in r.basis)
    # the shipped table: 13B training on an H100 has no measurement; it is derived from the 1B by FLOPs per token
    real = load_calibration()
    r13 = lookup_rate(real, "h100", "train_sft", named_shape(real, "olmo2-13b"), 512.0)
    assert r13.kind == "derived" and any("FLOPs per token" in b for b in r13.basis)


def test_a_student_too_big_for_one_card_is_flagged():
    cfg = hand_config()
    cfg["students"]["s"]["name_or_path"] = "allenai/OLMo-2-1124-13B"
    cal = hand_calibration()
    cal["hardware"]["card"]["memory_gb"] = 80
    sft = next(s for s in forecast_config(cfg, "card", cal).stages if s.stage_id == "student.train.sft_gt.s.d.s1")
    assert sft.kind == "does not fit" and any("DOES NOT FIT" in b for b in sft.basis)


def test_unknown_hardware_is_a_clear_error_listing_the_known_ones(capsys):
    with pytest.raises(ForecastError, match=r"unknown hardware 'a100'; known: cpu, h100, h200"):
        forecast_config(hand_config(), "a100")
    assert forecast_main(["--configfile", str(ROOT / "configs" / "olmo2_cluster.yaml"), "--hardware", "a100"]) == 2
    assert "known: cpu, h100, h200" in capsys.readouterr().err


def test_model_of_unknown_size_names_the_config_key():
    cfg = hand_config()
    cfg["students"]["s"]["name_or_path"] = "someone/mystery-model"
    with pytest.raises(ForecastError, match=r"config key 'students.s'.*mystery-model"):
        forecast_config(cfg, "h100")


def test_cpu_forecast_of_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "fc.json"
    assert forecast_main(["--configfile", str(ROOT / "workflow_config.yaml"), "--hardware", "cpu", "--json",
                          str(out)]) == 0
    data = json.loads(out.read_text())
    plan = build_plan(validate_config(yaml.safe_load((ROOT / "workflow_config.yaml").read_text())))
    assert [s["stage_id"] for s in data["stages"]] == plan.all_stage_ids()
    assert all(s["time_s"] > 0 and s["gpu_kwh"] == 0 and s["kwh"] > 0 for s in data["stages"])
    assert "| student.train.sft_gt.tiny.arith.s1 |" in capsys.readouterr().out


def test_cluster_forecast_and_study_comparison():
    cfg = validate_config(yaml.safe_load((ROOT / "configs" / "olmo2_cluster.yaml").read_text()))
    fc = forecast_config(cfg, "h100")
    assert len(fc.stages) == len(build_plan(cfg).all_stage_ids())
    rows = study_comparison("h100")
    gen = next(r for r in rows if r["stage"].startswith("synthetic generation, Tulu"))
    # measured 32B-shape generation on an H200, moved to the H100 by the measured HBM bandwidths
    assert gen["kind"] == "derived" and any("h200 -> h100" in b for b in gen["basis"])
    assert gen["study_j_per_token"] == pytest.approx(3.84, abs=0.01)


def test_forecast_vs_measured_writes_ratios_per_stage(tmp_path):
    cfg = hand_config()
    fc = forecast_config(cfg, "h100")
    sft = next(s for s in fc.stages if s.stage_id == "student.train.sft_gt.s.d.s1")
    measured = {sft.stage_id: {"duration_s": 2 * sft.time_s, "energy": {"total_kwh": 3 * sft.kwh},
                               "devices": {"gpu": {"devices": [{"name": "NVIDIA H100 80GB HBM3"}]}}}}
    text = forecast_vs_measured(cfg, measured)
    row = next(line for line in text.splitlines() if line.startswith("| student.train.sft_gt.s.d.s1"))
    assert "| 2.00 |" in row and "| 3.00 |" in row and text.startswith("# Forecast vs measured (h100")
    path = write_forecast_vs_measured(cfg, measured, tmp_path)
    assert path.read_text() == text
