"""The GPU benchmarks' --quick modes (tiny shapes on CPU) run every code path and write their JSON and table, so the
scripts that produce docs/BENCHMARKS.md cannot rot between GPU sessions. No timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, out: Path, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), "--quick", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_shape_benchmark_times_new_and_seen_lengths(tmp_path):
    run("gpu_shapes.py", tmp_path, "--n", "4")
    res = json.loads((tmp_path / "gpu_shapes.json").read_text())
    for measure in ("train_step", "matmuls_one_layer"):
        assert set(res[measure]) == {"new", "seen", "new_x64", "seen_x64"}
        assert all(r["median_ms"] > 0 and 0 < r["steps"] <= 4 for r in res[measure].values())


def test_generation_benchmark_runs_llama_and_olmo_shapes(tmp_path):
    out = run("gpu_generation.py", tmp_path, "--shapes", "olmo2-1b,llama3.2-1b", "--variants",
              "eager_b64,graph_b64_n512,llama3.2-1b:graph_b64,llama3.2-1b:graph_b64_bmm,llama3.2-1b:graph_b64_sdpa,"
              "llama3.2-1b:graph_b64_gqa,llama3.2-1b:graph_b64_pp,llama3.2-1b:graph_b64_ppu,"
              "llama3.2-1b:graph_b64_pp_bmm_mat", "--profile-prefill", "--profile-decode",
              "grouped,grouped_bmm:max-autotune")
    res = json.loads((tmp_path / "gpu_generation.json").read_text())
    for shape, extra in (("olmo2-1b", []),
                         ("llama3.2-1b", ["graph_b64", "graph_b64_bmm", "graph_b64_sdpa", "graph_b64_gqa",
                                          "graph_b64_pp", "graph_b64_ppu", "graph_b64_pp_bmm_mat"])):
        runs = res["shapes"][shape]["runs"]
        assert [r["variant"] for r in runs] == ["eager_b64", "graph_b64_n512"] + extra
        assert all(r["generated_tokens"] > 0 and r["fraction_of_roofline"] > 0 for r in runs)
    by_name = {r["variant"]: r for r in res["shapes"]["llama3.2-1b"]["runs"]}
    for name, attention in (("graph_b64", "grouped"), ("graph_b64_bmm", "grouped_bmm"), ("graph_b64_sdpa", "sdpa"),
                            ("graph_b64_gqa", "sdpa_gqa")):
        # every decode attention gives eager generate's greedy tokens (fp32 on CPU)
        assert by_name[name]["decode_attention"] == attention and by_name[name]["rows_identical_to_eager"] == 1.0
        assert 0 < by_name[name]["fraction_of_prefill_plus_decode_roofline"] < 1
        assert by_name[name]["prefill"] == "eager"
    # the packed prefill; the compiled one (_pc) is the package's, tested in test_generation_static.py
    assert by_name["graph_b64_pp"]["prefill"] == "packed" and by_name["graph_b64_pp"]["rows_identical_to_eager"] == 1.0
    assert by_name["graph_b64_pp"]["rows_identical_to_padded_prefill"] == 1.0
    assert by_name["graph_b64_ppu"]["prefill"] == "packed_unfused"
    assert by_name["graph_b64_ppu"]["rows_identical_to_padded_prefill"] == 1.0
    bmm = by_name["graph_b64_pp_bmm_mat"]   # two-bmm decode attention, max-autotune compile (a no-op on CPU)
    assert (bmm["decode_attention"], bmm["decode_compile_mode"]) == ("grouped_bmm", "max-autotune")
    assert bmm["rows_identical_to_default_decode"] == bmm["tokens_identical_to_default_decode"] == 1.0
    assert by_name["graph_b64_pp"]["decode_compile_mode"] == "reduce-overhead"
    profiles = res["shapes"]["llama3.2-1b"]["decode_profile"]
    assert [(p["attention"], p["compile_mode"]) for p in profiles.values()] == [
        ("grouped", "reduce-overhead"), ("grouped_bmm", "max-autotune")]
    for profile in profiles.values():
        # a 16-token run minus a 2-token run: 14 decode steps, each timed and set against its bytes
        assert profile["decode_steps"] == 14 and profile["step_us_wall"] > 0
        assert profile["kv_cache_bytes"] == profile["rows"] * profile["cache_len"] * \
            res["shapes"]["llama3.2-1b"]["kv_bytes_per_position"]
    assert "llama3.2-1b | graph_b64_n512" in out
    for shape in ("olmo2-1b", "llama3.2-1b"):   # the packed prefill profiled with and without fusing
        profile = res["shapes"][shape]["prefill_profile"]
        assert set(profile) == {"fused", "unfused"}
        for kind, p in profile.items():
            assert p["batches"] == 2 and p["prompt_tokens"] > 0 and 0 < p["fraction_of_ideal"]
            name = f"{shape}_packed_prefill{'' if kind == 'fused' else '_unfused'}_b8"
            assert (tmp_path / "profiles" / f"{name}_profile.json").exists()
            assert (tmp_path / "profiles" / f"{name}_trace.json.gz").stat().st_size > 0


def test_optimizer_benchmark_times_every_step_against_its_bytes(tmp_path):
    out = run("gpu_optimizer.py", tmp_path, "--steps", "3", "--warmup", "1")
    res = json.loads((tmp_path / "gpu_optimizer.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["hf_default", "fused", "fused_clip", "compiled_clip", "flat_bound"]
    assert not [r for r in rows.values() if "error" in r]
    assert all(r["ms_per_step"] > 0 and r["gb_per_step"] * 1e9 == r["bytes_per_param"] * res["parameters"]
               for r in rows.values())
    # the clipping variants make HF's update; fused alone skips the clip, so it differs
    assert rows["fused_clip"]["max_abs_diff_vs_hf_default"] < 1e-6
    assert rows["compiled_clip"]["max_abs_diff_vs_hf_default"] < 1e-6
    assert rows["fused"]["max_abs_diff_vs_hf_default"] > 1e-6
    assert "compiled_clip |" in out and (tmp_path / "table.txt").exists()


def test_trainer_benchmark_runs_layouts_compile_and_kd_with_exact_budgets(tmp_path):
    out = run("gpu_trainer.py", tmp_path, "--checks", "sdpa", "--fresh-shapes", "--variants",
              "sft_pad_eager,sft_padfree_layers_m64,kd_padfree_eager,sft_gpu_defaults_syncs", "--profile",
              "sft_pad_eager,kd_padfree_eager")
    runs = json.loads((tmp_path / "trainer_runs.json").read_text())["runs"]
    assert [(r["variant"], r["repeat"]) for r in runs] == [
        ("sft_pad_eager", 0), ("sft_padfree_layers_m64", 0), ("kd_padfree_eager", 0), ("sft_gpu_defaults_syncs", 0),
        ("sft_pad_eager", -2), ("kd_padfree_eager", -2)]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in runs)
    assert runs[0]["graphs_compiled_in_window"] == 0   # eager: nothing compiles inside its timed window
    assert all(r["graphs_compiled_in_window"] >= 0 for r in runs)
    assert len({r["seed"] for r in runs}) == 6, "--fresh-shapes gives every run its own data order"
    prof = json.loads((tmp_path / "profile" / "sft_pad_eager_profile.json").read_text())
    assert prof["steps"] == 3 and prof["wall_s"] > 0
    assert prof["graphs_compiled_in_window"] == 0   # an eager variant: nothing compiles inside its profiled steps
    assert (tmp_path / "profile" / "kd_padfree_eager_profile.json").is_file()
    assert "per variant, over its repeats" in out


def test_trainer_benchmark_counts_every_micro_batch_of_an_accumulated_step(tmp_path):
    run("gpu_trainer.py", tmp_path, "--checks", "sdpa", "--variants", "sft_gpu_defaults_ga2")
    (r,) = json.loads((tmp_path / "trainer_runs.json").read_text())["runs"]
    assert r["grad_accum"] == 2 and r["status"] == "complete" and r["trained_tokens"] == r["token_budget"]
    assert r["window"]["examples"] == (r["steps"] - r["warmup_steps"]) * r["batch"] * 2


def test_cache_benchmark_compares_the_cache_build_with_a_bare_forward_of_the_same_batches(tmp_path):
    out = run("gpu_suite.py", tmp_path, "--sections", "caching", "--cache-k", "8")
    res = json.loads((tmp_path / "caching_olmo2-1b.json").read_text())
    assert [r["kind"] for r in res["runs"]] == ["bare", "cache", "cache", "bare"]
    assert len({r["input_tokens"] for r in res["runs"]}) == 1, "both read the same batches"
    built = [r for r in res["runs"] if r["kind"] == "cache"]
    assert all(r["positions"] > 0 and r["bytes_per_position"] == res["bytes_per_position"] for r in built)
    rate = sum(r["input_tokens"] for r in built) / sum(r["time_s"] for r in built)
    assert res["cache_tokens_per_s"] == pytest.approx(rate)
    assert res["fraction_of_bare"] == pytest.approx(rate / res["bare_tokens_per_s"])
    assert res["study_bytes_per_position"] == 1600 and "vs bare forward" in out


def test_workstation_benchmark_runs_every_stage_of_the_config_and_scales_it(tmp_path):
    out = run("gpu_workstation.py", tmp_path)
    res = json.loads((tmp_path / "gpu_workstation.json").read_text())
    stages = res["stages"]
    assert [k for k, r in stages.items() if r.get("error") or r.get("skipped")] == []
    for label in ("teacher.generate", "teacher.logits", "student.train.sft_gt.qwen05", "student.train.kd.qwen05",
                  "student.train.sft_gt.smol360", "student.train.dpo.qwen05", "teacher.sample.qwen05",
                  "eval.kd.qwen05", "eval.teacher", "student.logits.qwen05"):
        assert stages[label]["tokens"] > 0 and stages[label]["steady_tok_per_s"] > 0, label
    budget = res["sections"]["training"]["token_budget"]
    for label in ("student.train.sft_gt.qwen05", "student.train.kd.qwen05", "student.train.sft_gt.smol360"):
        assert stages[label]["tokens"] == budget                              # counted exactly
        assert stages[label]["loss_last"] < stages[label]["loss_first"], label  # it learns
    assert stages["student.train.dpo.qwen05"]["loss_last"] != stages["student.train.dpo.qwen05"]["loss_first"]
    dpo = stages["student.train.dpo.qwen05"]["metrics"]
    assert dpo["dropped_over_max_length"] == 0 and dpo["pairs"] == res["sections"]["dpo"]["n_prompts"]
    # random weights never stop: every teacher prompt generates max_new_tokens, counted with the teacher's tokenizer
    syn = res["sections"]["synthetic"]
    assert stages["teacher.generate"]["tokens"] == syn["n_prompts"] * syn["max_new_tokens"]
    scaled = res["scaled"]
    assert not [r for r in scaled["rows"] if r.get("missing")]
    jobs = {r["stage"]: r["jobs"] for r in scaled["rows"]}
    assert jobs["eval initial students"] == 2 and jobs["eval trained students"] == 11   # one seed's
    assert scaled["seeds"] == 3 and scaled["shared_s"] > 0 and scaled["per_seed_s"] > 0
    assert scaled["all_seeds_s"] == pytest.approx(scaled["shared_s"] + 3 * scaled["per_seed_s"])
    assert "Scaled to configs/workstation.yaml" in out and "| teacher.logits |" in out

    # training rates come from the trainer's step window (the meter's steady state runs on through the final save)
    for label in ("student.train.sft_gt.qwen05", "student.train.kd.qwen05", "student.train.dpo.qwen05"):
        assert stages[label]["steady_tok_per_s"] == stages[label]["metrics"]["speed"]["trained_tokens_per_s"]
    # --rescale re-derives an earlier run's rates and tables without running anything
    older = {**res, "stages": {k: ({**r, "steady_tok_per_s": 1.0, "rate_basis": "steady state (meter)"}
                                   if r.get("token_kind") == "trained_tokens" else r)
                               for k, r in stages.items()}}
    (tmp_path / "older.json").write_text(json.dumps(older))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_workstation.py"), "--out",
                           str(tmp_path / "rescaled"), "--rescale", str(tmp_path / "older.json")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rescaled = json.loads((tmp_path / "rescaled" / "gpu_workstation.json").read_text())
    assert rescaled["stages"]["student.train.dpo.qwen05"]["steady_tok_per_s"] == \
        stages["student.train.dpo.qwen05"]["steady_tok_per_s"]
    assert rescaled["scaled"]["per_seed_s"] == pytest.approx(scaled["per_seed_s"])

    # a second call runs only what it is asked to and keeps the first call's records for the skipped stages,
    # also those only reached through a skipped stage's output (KD needs the teacher's cache)
    first = tmp_path / "gpu_workstation.json"
    earlier = tmp_path / "earlier.json"
    earlier.write_text(first.read_text())
    skipped = ("teacher.generate", "teacher.logits", "student.train.kd.qwen05", "eval.kd.qwen05")
    second = tmp_path / "second"
    out = run("gpu_workstation.py", second, "--previous", str(earlier), "--skip", ",".join(skipped))
    again = json.loads((second / "gpu_workstation.json").read_text())["stages"]
    for label in skipped:
        assert again[label]["from_previous_run"] and again[label]["seconds"] == stages[label]["seconds"], label
    assert not again["eval.teacher"].get("from_previous_run") and again["eval.teacher"]["tokens"] > 0
    assert "| teacher.logits (earlier run) |" in out
    assert not [r for r in json.loads((second / "gpu_workstation.json").read_text())["scaled"]["rows"]
                if r.get("missing")]


def test_multi_gpu_benchmark_runs_sft_kd_dpo_and_loss_check_through_the_launch(tmp_path):
    out = run("gpu_multi.py", tmp_path, "--runs", "sft,kd,losscheck,dpo")
    res = json.loads((tmp_path / "multi_gpu.json").read_text())
    runs = {r["run"]: r for r in res["runs"]}
    assert set(runs) == {"sft", "kd", "losscheck_gpus1", "losscheck_gpus2", "dpo"}
    assert all(r["status"] == "complete" and r["trained_tokens"] > 0 for r in runs.values()), runs
    for name in ("sft", "kd", "losscheck_gpus2", "dpo"):   # the stage re-launched itself on two processes
        assert runs[name]["distributed"]["world_size"] == 2 and runs[name]["speed"]["world_size"] == 2
        assert runs[name]["speed"]["window_steps"] >= 1 and runs[name]["speed"]["input_tokens_per_s"] > 0
    assert runs["sft"]["mfu"] > 0 and res["kd_cache"]["tokens"]["cached_positions"] > 0
    assert res["losscheck"]["max_rel_diff"] < 1e-4   # fp32 on CPU: only the order of float sums differs
    assert "losscheck: " in out


def test_fsdp_compile_check_trains_sharded_ways_over_the_same_batches(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           str(ROOT / "benchmarks" / "fsdp_compile_check.py"), "--out", str(tmp_path), "--quick",
                           "--ways", "none,forward"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "fsdp_compile_check.json").read_text())
    assert res["world_size"] == 2 and set(res["ways"]) == {"none", "forward"}
    assert all(r["finite"] and len(r["losses"]) == 3 for r in res["ways"].values())
    assert res["ways"]["forward"]["max_rel_loss_diff_vs_none"] < 1e-5   # fp32 on CPU: kernels differ, not the math
    assert "forward | yes" in proc.stdout


def run_session(out: Path, **env: str) -> subprocess.CompletedProcess:
    """benchmarks/gpu_perf_session.sh --quick with OUT=out and ``env`` added to this environment."""
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_perf_session.sh"), "--quick"], capture_output=True,
                          text=True, env=env, timeout=900)


def session_files(out: Path, **env: str) -> tuple[list[str], str]:
    """A session that must succeed: the names of the files it left in ``out`` and its summary table."""
    proc = run_session(out, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted(p.name for p in out.iterdir()), (out / "summary.txt").read_text()


def test_gpu_session_script_quick_writes_its_files_and_table(tmp_path):
    files, summary = session_files(tmp_path / "out", SESSION_QUICK_RUNS="sft",
                                   SESSION_QUICK_VARIANTS="sft_gpu_defaults,sft_gpu_defaults_fusedclip")
    assert files == ["multi_gpu.json", "session.tar.gz", "steps.tsv", "summary.txt", "trainer_runs.json"]
    steps = [line.split("\t") for line in (tmp_path / "out" / "steps.tsv").read_text().splitlines()[1:]]
    assert [(s[0], s[1]) for s in steps] == [("a_multi", "0"), ("c_optimizer", "0")]
    assert "sft | complete" in summary and "sft_gpu_defaults_fusedclip" in summary


def test_one_gpu_session_plan_runs_the_cache_comparison_and_interleaved_optimizer_variants(tmp_path):
    files, summary = session_files(tmp_path / "out", SESSION_PLAN="one-gpu",
                                   SESSION_QUICK_VARIANTS="sft_gpu_defaults,sft_gpu_defaults_ga2")
    assert files == ["caching_olmo2-1b.json", "session.tar.gz", "steps.tsv", "summary.txt", "trainer_runs.json"]
    runs = json.loads((tmp_path / "out" / "trainer_runs.json").read_text())["runs"]
    assert [(r["variant"], r["repeat"]) for r in runs] == [
        ("sft_gpu_defaults", 0), ("sft_gpu_defaults_ga2", 0), ("sft_gpu_defaults_ga2", 1), ("sft_gpu_defaults", 1)]
    assert "cache / bare forward:" in summary and "sft_gpu_defaults_ga2" in summary


def test_gpu_session_script_refuses_an_unknown_plan(tmp_path):
    proc = run_session(tmp_path / "out", SESSION_PLAN="three-gpu")
    assert proc.returncode == 2 and "SESSION_PLAN=three-gpu" in proc.stderr


def test_harness_overhead_benchmark_times_stage_imports(tmp_path):
    out = run("harness_overhead.py", tmp_path)
    res = json.loads((tmp_path / "harness_overhead.json").read_text())
    assert res["python_floor_s"] > 0 and len(res["rows"]) == 3
    assert all(r["imports_s"] > 0 and r["process_s"] >= r["imports_s"] for r in res["rows"])
    assert "stage:prepare_data" in out


def test_stage_startup_benchmark_splits_a_gpu_stage_start_into_its_steps(tmp_path):
    out = run("stage_startup.py", tmp_path)
    res = json.loads((tmp_path / "stage_startup.json").read_text())
    steps = [r["step"] for r in res["rows"]]
    assert steps[:2] == ["import distill_bench.energy", "import torch"] and steps[-1] == "total"
    assert "load model onto the device" in steps and "CUDA initialisation" in steps
    total = res["rows"][-1]["median_s"]
    assert total > 0 and abs(total - sum(r["median_s"] for r in res["rows"][:-1])) < 1e-6
    assert "load model onto the device" in out


def test_generation_variant_names_select_prefill_and_decode_attention():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_generation import parse_variant

    assert parse_variant("graph_b64") == ("graph", 64, None, "grouped", "eager")
    assert parse_variant("graph_b64_pc") == ("graph", 64, None, "grouped", "compiled")
    assert parse_variant("graph_b128_n512_pc_bmm") == ("graph", 128, 512, "grouped_bmm", "compiled")
    assert parse_variant("eager_b64_n512") == ("eager", 64, 512, "grouped", "eager")
    assert parse_variant("graph_b64_n256_pp_gqa") == ("graph", 64, 256, "sdpa_gqa", "packed")
    assert parse_variant("graph_b64_ppu") == ("graph", 64, None, "grouped", "packed_unfused")
    assert parse_variant("graph_b64_pp_bmm_mat") == ("graph", 64, None, "grouped_bmm", "packed")
    from gpu_generation import decode_compile_mode, decode_twin

    assert [decode_compile_mode(n) for n in ("graph_b64_pp_mat", "graph_b64_pp")] == ["max-autotune",
                                                                                      "reduce-overhead"]
    assert [decode_twin(n) for n in ("graph_b64_pp_bmm_mat", "graph_b64_bmm", "graph_b64_pp", "cb_256")] == \
        ["graph_b64_pp", "graph_b64", None, None]
    from gpu_generation import eager_twin, padded_twin

    assert [eager_twin(n) for n in ("graph_b64_pc_bmm", "hf_static_b64", "graph_b64_n512_gqa", "cb_256")] == \
        ["eager_b64", "eager_b64", "eager_b64_n512", None]
    assert [padded_twin(n) for n in ("graph_b64_pp", "graph_b64_ppu", "graph_b64_n512_pc_bmm", "graph_b64",
                                     "cb_256")] == ["graph_b64", "graph_b64", "graph_b64_n512_bmm", None, None]


def test_benchmark_models_too_large_for_fp32_are_built_in_their_dtype():
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_suite import OLMO2_32B, TINY, make_model

    assert OLMO2_32B["build_in_dtype"] and OLMO2_32B["num_key_value_heads"] == 8
    model = make_model(dict(TINY, build_in_dtype=True), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32   # restored after the build


def test_kd_collator_benchmark_times_the_collator_and_checks_the_word_decoder_against_bits(tmp_path):
    out = run("kd_collator_cpu.py", tmp_path)
    res = json.loads((tmp_path / "kd_collator_cpu.json").read_text())
    assert res["id_encoding"] == "packed17"
    for key in ("kd_collator_ms", "teacher_rows_ms", "student_layout_ms", "decode_ids_ms", "decode_ids_bitwise_ms"):
        assert res[key] > 0, key
    assert res["positions_per_batch"] > 0 and "kd_collator | " in out


def test_kd_loss_benchmark_times_ce_and_kd_against_the_eager_loss_at_each_temperature(tmp_path):
    """The compiled variants only set kd_loss's compiled_terms (its equality with eager is tested in
    test_kd_trainer.py); compiling on a CPU would cost this test most of its time."""
    out = run("gpu_kd_loss.py", tmp_path, "--variants", "ce,kd,kd_tau2")
    runs = {r["variant"]: r for r in json.loads((tmp_path / "gpu_kd_loss.json").read_text())["runs"]}
    assert set(runs) == {"ce", "kd", "kd_tau2"} and all(r["median_ms"] > 0 for r in runs.values())
    for name in ("kd", "kd_tau2"):   # each against the eager loss at its own temperature
        assert runs[name]["max_grad_diff_to_eager"] == 0.0 and runs[name]["loss_diff_to_eager"] == 0.0
    assert runs["kd_tau2"]["loss"] != runs["kd"]["loss"] and "kd_tau2 | " in out


def test_profile_idle_gaps_charge_each_host_op_its_self_time_while_the_gpu_waits():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_trainer import idle_gaps

    kernels = [(0, 100), (90, 200), (300, 400), (405, 500), (700, 800)]   # gaps 200-300 and 500-700; 400-405 is not
    ops = [("main", "enumerate(DataLoader)", 150, 350, None),   # 100 of it in the first gap, 60 of them its child's
           ("main", "aten::copy_", 240, 300, 0),
           ("main", "cudaStreamSynchronize", 480, 650, None),
           ("thread 7", "autograd", 0, 800, None)]
    res = idle_gaps(kernels, ops, min_gap_us=10)
    assert res["idle_us"] == 300 and res["gaps"] == 2 and res["largest_gaps_us"] == [200, 100]
    got = {(h["thread"], h["op"]): h["us"] for h in res["host_self_us_in_gaps"]}
    assert got == {("main", "enumerate(DataLoader)"): 40, ("main", "aten::copy_"): 60,
                   ("main", "cudaStreamSynchronize"): 150, ("main", "(no traced op: Python between ops)"): 50,
                   ("thread 7", "autograd"): 300}
    assert res["idle_us_between"] == [], "unnamed activities: no pairs"


def test_profile_kernel_kinds_name_fused_kernels_compiled_even_when_their_ops_include_a_copy():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_trainer import kernel_kind

    assert kernel_kind("triton_red_fused__to_copy_mean_mul_pow_rsqrt_0") == "compiled (triton)"
    assert kernel_kind("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>") == "copy/fill"
    assert kernel_kind("nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_TNT") == "gemm"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<...>") == "attention"


def test_profile_counts_kernels_named_after_lambdas_and_skips_user_annotations():
    """Eager elementwise kernels are templates over lambdas ("{lambda()#1}"): counting them as annotations once left
    them out of the kernel table and made their time look like idle gaps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from types import SimpleNamespace

    from gpu_trainer import is_annotation

    kernel = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
              "BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::"
              "MulFunctor<float> > >(at::TensorIteratorBase&, {lambda(int)#1}>(int, {lambda(int)#1})")
    plain = SimpleNamespace()
    assert not is_annotation(plain, kernel) and not is_annotation(plain, "triton_poi_fused_mul_silu_0")
    assert is_annotation(plain, "Optimizer.step#AdamW.step") and is_annotation(plain, "ProfilerStep#3")
    assert is_annotation(SimpleNamespace(is_user_annotation=True), "my_range")


def test_profile_idle_gaps_total_the_idle_time_by_the_activities_around_each_gap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_trainer import idle_gaps

    kernels = [(0, 100, "gemm"), (50, 150, "norm"), (170, 200, "attention"), (260, 300, "gemm"),
               (300, 330, "norm"), (350, 400, "attention")]   # gaps 150-170 (20), 200-260 (60), 330-350 (20)
    res = idle_gaps(kernels, [], min_gap_us=10)
    assert res["idle_us"] == 100
    assert res["idle_us_between"] == [{"after": "attention", "before": "gemm", "us": 60},
                                      {"after": "norm", "before": "attention", "us": 40}]


def test_trainer_benchmark_means_leave_out_runs_that_compiled_in_their_window_and_pick_the_same_settings_twin():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_trainer import sft_twin, variant_means

    def run(variant, tps, compiles=0, repeat=0):
        return {"variant": variant, "kind": variant.split("_")[0], "tokens_per_s": tps, "mfu": tps / 1e5,
                "step_s": 4000 / tps, "graphs_compiled_in_window": compiles, "repeat": repeat}

    runs = [run("sft_x", 50_000, repeat=-1), run("sft_x", 51_000), run("sft_x", 51_400, repeat=1),
            run("kd_x", 47_000), run("kd_x", 22_000, compiles=2, repeat=1),
            run("kd_x_workers2", 30_000, compiles=1), run("sft_x_workers2", 50_000)]
    means = variant_means(runs)
    assert means["sft_x"]["n"] == 2 and means["sft_x"]["tokens_per_s"] == 51_200   # the throwaway left out
    assert means["kd_x"]["n"] == 1 and means["kd_x"]["tokens_per_s"] == 47_000 and means["kd_x"]["excluded"] == 1
    assert means["kd_x_workers2"]["clean"] is False and means["kd_x_workers2"]["n"] == 1   # kept, marked
    assert sft_twin("kd_x_workers2", means) == "sft_x_workers2"
    assert sft_twin("kd_x_losseager", means) == "sft_x"
    assert sft_twin("kd_y", means) is None
