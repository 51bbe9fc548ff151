"""The Snakemake workflow end to end: dry-runs plan the right jobs, a tiny config runs to the comparison table, and a
change to one experiment's hyperparameter reruns only that experiment's jobs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str, cwd: Path, check: bool = True, timeout: int = 2400) -> subprocess.CompletedProcess:
    """A hang guard, not a speed target: the tiny run took over 900 s on a loaded 2-core machine."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(cwd), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def planned_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job in a dry-run's output."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not head:
            continue
        wildcards = {}
        found = re.search(r"wildcards: (.*)", block)
        if found:
            for item in found.group(1).split(", "):
                key, _, value = item.partition("=")
                wildcards[key.strip()] = value.strip()
        jobs.append((head.group(1), wildcards))
    return jobs


def test_embedded_default_dry_run_plans_every_stage(tmp_path):
    proc = snakemake("-n", cwd=tmp_path)
    rules = {rule for rule, _ in planned_jobs(proc.stdout)}
    assert {"prepare_data", "prepare_tokenizer", "prepare_teacher", "init_student", "cache_logits",
            "generate_synthetic", "merge_synthetic", "train_student", "evaluate", "idle_baseline",
            "rollup"} <= rules
    caching = [w["artifact"] for r, w in planned_jobs(proc.stdout) if r == "cache_logits"]
    kd_students = [w for r, w in planned_jobs(proc.stdout) if r == "train_student" and w["exp"].startswith("kd.")]
    teacher_caches = [a for a in caching if "-from-" not in a]      # the others: self-distillation's, one per seed
    seeds = yaml.safe_load((ROOT / "workflow_config.yaml").read_text())["seeds"]
    assert len(seeds) >= 3
    assert len(teacher_caches) == 1 and len(kd_students) == 2 * len(seeds), \
        "one teacher logit cache must feed both KD students at every seed"
    assert len(caching) == 1 + len(seeds)
    assert not (tmp_path / "results").exists(), "a dry-run reads no energy counters and writes no run snapshot"


def test_cluster_example_dry_run_shows_gpu_resources_without_network(tmp_path):
    proc = snakemake("-n", "--configfile", str(ROOT / "configs" / "olmo2_cluster.yaml"), cwd=tmp_path)
    jobs = planned_jobs(proc.stdout)
    trains = [w for r, w in jobs if r == "train_student"]
    assert len(trains) == 27
    evals = {(w["model_id"], w["eval_name"]) for r, w in jobs if r == "evaluate"}
    for task in ("gsm8k", "mmlu", "ifeval"):
        assert ("teacher", task) in evals and ("kd.olmo2_1b.tulu3.s1", task) in evals
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout)
    train_block = next(b for b in blocks if b.strip().startswith(("rule train_student", "localrule train_student")))
    assert "gpu=1" in train_block and "gpu_model=h100" in train_block


GPU_CAPABLE_RULES = {"prerun", "idle_baseline", "prepare_teacher", "cache_logits", "cache_tail", "generate_synthetic",
                     "sample_preferences", "judge_preferences", "precompute_reference", "train_student", "evaluate"}


def test_single_gpu_config_validates_and_dry_runs_with_every_gpu_rule_asking_for_one(tmp_path):
    proc = snakemake("-n", "--configfile", str(ROOT / "configs" / "gpu_single.yaml"), cwd=tmp_path)
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout)
    gpu_rules, cpu_rules = set(), set()
    for block in blocks:
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        if head:
            (gpu_rules if re.search(r"\bgpu=1\b", block) else cpu_rules).add(head.group(1))
    assert {"prepare_teacher", "cache_logits", "generate_synthetic", "train_student", "evaluate",
            "idle_baseline", "prerun"} <= gpu_rules <= GPU_CAPABLE_RULES
    assert {"prepare_data", "prepare_tokenizer", "init_student", "merge_synthetic", "rollup"} <= cpu_rules
    trains = [w for r, w in planned_jobs(proc.stdout) if r == "train_student"]
    assert len(trains) == 5   # sft_gt, kd at two temperatures, sft, dpo
    assert not (tmp_path / "results_gpu_single").exists(), "a dry-run reads no counters and writes nothing"


@pytest.mark.parametrize("configs, results_dir", [
    (None, "results_gpu_single"),
    ("configs/gpu_single.yaml configs/gpu_single_shared.yaml", "results_gpu_single_shared"),
])
def test_gpu_workflow_check_dry_mode_plans_the_single_gpu_run_on_cpu(tmp_path, configs, results_dir):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if configs:
        env["CONFIGS"] = configs
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_workflow_check.sh"), "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "This was a dry-run" in proc.stdout and "snakemake exit status: 0" in proc.stdout
    log = (tmp_path / "out" / "snakemake.log").read_text()
    assert f"{results_dir}/energy/" in log and (configs is None) == ("results_gpu_single_shared" not in log)
    for name in ("before.json", "after.json", "snakemake.log"):
        assert (tmp_path / "out" / name).exists()
    assert "time" in json.loads((tmp_path / "out" / "before.json").read_text())


def _run_tiny(workdir: Path, config: Path = TINY) -> None:
    snakemake("-c2", "--configfile", str(config), cwd=workdir)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("tiny_run")
    _run_tiny(workdir)
    return workdir


def test_tiny_config_runs_to_the_comparison_table(tiny_run):
    summary = tiny_run / "results" / "summary"
    table = pd.read_csv(summary / "comparison.csv")
    assert set(table.pipeline) == {"sft_gt", "kd", "sft", "dpo", "selfdistill", "continued"}
    sft_family = table[table.pipeline != "dpo"]
    assert (sft_family.trained_tokens == 1500).all(), "every SFT-family pipeline trains on exactly the shared budget"
    dpo = table[table.pipeline == "dpo"].iloc[0]
    assert dpo.lineage == "sft.tiny.arith -> dpo.tiny.arith" and dpo.upstream_kwh_oneoff > 0
    kd = table[table.pipeline == "kd"]
    assert kd.artifact.nunique() == 1 and (kd.artifact_consumers == 2).all()
    assert (kd.teacher_kwh_oneoff > 0).all() and (table[table.pipeline == "sft_gt"].teacher_kwh_oneoff == 0).all()
    for name in ("comparison.md", "stages.csv", "pareto.png", "energy_by_role.png", "run_timeline.png",
                 "reconciliation.md", "reconciliation.json"):
        assert (summary / name).stat().st_size > 0
    recon = json.loads((summary / "reconciliation.json").read_text())
    assert (tiny_run / "results" / "energy" / "runs" / recon["run_id"] / "start.json").exists()
    assert {d["device"]: d["status"] for d in recon["devices"]} == {"gpu": "unavailable", "cpu": "unavailable"}
    assert recon["windows"]["in_run"] >= 27 and recon["violations"] == []
    assert f"Reconciliation (run {recon['run_id']}" in (summary / "comparison.md").read_text()
    stages = pd.read_csv(summary / "stages.csv")
    assert (stages.status == "complete").all()
    assert set(stages.role) >= {"setup", "data", "teacher", "student", "eval"}
    wandb_runs = (summary / "wandb_runs.txt").read_text().split()
    assert len(wandb_runs) == len(table) + 1, "one offline W&B run per experiment plus the stages run"
    merged = yaml.safe_load((tiny_run / "results" / "config" / "merged_config.yaml").read_text())
    assert merged["training"]["token_budget"] == 1500 and merged["eval"]["confidence"] == 0.95


def _replan(tiny_run: Path, tmp_path: Path, mutate) -> list[tuple[str, dict[str, str]]]:
    cfg = yaml.safe_load(TINY.read_text())
    mutate(cfg)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    return planned_jobs(snakemake("-n", "--configfile", str(changed), cwd=tiny_run).stdout)


def test_changing_one_experiments_hyperparameter_reruns_only_its_jobs(tiny_run, tmp_path):
    def mutate(cfg):   # continued training: nothing builds on it
        next(e for e in cfg["experiments"] if e["pipeline"] == "continued")["overrides"]["training"] = {"lr": 1e-3}

    jobs = _replan(tiny_run, tmp_path, mutate)
    assert [w["exp"] for r, w in jobs if r == "train_student"] == ["continued.tiny.arith.s1"]
    assert [w["model_id"] for r, w in jobs if r == "evaluate"] == ["continued.tiny.arith.s1"]
    assert not {r for r, _ in jobs} & {"prepare_teacher", "cache_logits", "generate_synthetic", "init_student"}


def test_changing_a_checkpoint_others_build_on_reruns_its_lineage(tiny_run, tmp_path):
    def mutate(cfg):   # sft_gt: self-distillation learns from it and continued training continues it
        next(e for e in cfg["experiments"] if e["pipeline"] == "sft_gt")["overrides"] = {"training": {"lr": 1e-3}}

    jobs = _replan(tiny_run, tmp_path, mutate)
    trained = sorted(w["exp"] for r, w in jobs if r == "train_student")
    assert trained == ["continued.tiny.arith.s1", "selfdistill.tiny.arith.s1", "sft_gt.tiny.arith.s1"]
    caches = [w["artifact"] for r, w in jobs if r == "cache_logits"]
    assert len(caches) == 1 and "-from-sft_gt-" in caches[0], "only the self-distillation cache is rebuilt"
    assert not {r for r, _ in jobs} & {"prepare_teacher", "generate_synthetic", "sample_preferences"}


def test_adding_a_seed_plans_only_that_seeds_jobs(tiny_run, tmp_path):
    """seeds [1] -> [1, 2]: seed 2 of every student experiment trains and is evaluated; the teacher artifacts of the
    teacher (logit cache, synthetic set) are reused; seed 1's jobs and the shared setup do not rerun. Seed 2's own
    upstream-dependent artifacts (self-distillation's cache from sft_gt seed 2, DPO pairs sampled from sft seed 2)
    are new, because their teacher is a seed-2 student."""
    def mutate(cfg):
        cfg["seeds"] = [1, 2]

    jobs = _replan(tiny_run, tmp_path, mutate)
    groups = ["sft_gt.tiny.arith", "kd.tiny.arith.temperature-1", "kd.tiny.arith.temperature-2", "sft.tiny.arith",
              "selfdistill.tiny.arith", "continued.tiny.arith", "dpo.tiny.arith"]
    assert sorted(w["exp"] for r, w in jobs if r == "train_student") == sorted(f"{g}.s2" for g in groups)
    assert sorted(w["model_id"] for r, w in jobs if r == "evaluate") == sorted(f"{g}.s2" for g in groups)
    assert [w["artifact"] for r, w in jobs if r == "cache_logits"] == [
        a for r, a in [(r, w["artifact"]) for r, w in jobs if r == "cache_logits"] if "-from-sft_gt-s2-" in a]
    assert len([1 for r, _ in jobs if r == "cache_logits"]) == 1
    planned = {r for r, _ in jobs}
    assert not planned & {"prepare_data", "prepare_tokenizer", "prepare_teacher", "init_student",
                          "generate_synthetic", "merge_synthetic", "idle_baseline"}
    assert all(w.get("exp", w.get("model_id", "")).endswith(".s2") for r, w in jobs
               if r in ("train_student", "evaluate", "precompute_reference"))
    assert planned <= {"train_student", "evaluate", "cache_logits", "sample_preferences", "judge_preferences",
                       "precompute_reference", "config_snapshot", "rollup", "wandb_log", "all"}, planned


def test_unchanged_config_plans_nothing_even_reformatted(tiny_run, tmp_path):
    proc = snakemake("-n", "--configfile", str(TINY), cwd=tiny_run)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    reformatted = tmp_path / "reformatted.yaml"     # same values, keys re-ordered and re-styled
    reformatted.write_text(yaml.safe_dump(yaml.safe_load(TINY.read_text()), sort_keys=True, default_flow_style=False))
    proc = snakemake("-n", "--configfile", str(reformatted), cwd=tiny_run)
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_bad_config_stops_before_any_job_naming_the_key(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["training"]["lrr"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", str(bad), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "training.lrr" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def second_run(tmp_path_factory) -> Path:
    """The tiny config's sft_gt baseline again, at twice the token budget and scored by lm-evaluation-harness: one
    run serves the lm_eval backend's test and the two-run comparison's."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["run_name"] = "tiny-budget-3000"
    cfg["training"]["token_budget"] = 3000
    cfg["eval"]["backend"] = "lm_eval"
    cfg["experiments"] = [cfg["experiments"][0]]
    cfg["report"] = {"wandb": {"enabled": False}}
    workdir = tmp_path_factory.mktemp("second_run")
    config = workdir / "budget_lm_eval.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _run_tiny(workdir, config)
    return workdir


def test_lm_eval_backend_runs_offline_and_the_table_carries_its_scores(second_run):
    """The embedded task as a local lm-evaluation-harness task, scored offline, stderr in the table."""
    table = pd.read_csv(second_run / "results" / "summary" / "comparison.csv")
    assert list(table.eval_backend) == ["lm_eval"]
    assert table.strict_stderr.notna().all() and table.flexible_stderr.notna().all()
    result = json.loads((second_run / "results" / "eval" / "sft_gt.tiny.arith.s1" / "arith.json").read_text())
    assert result["backend"] == "lm_eval"
    assert "harness_version" in json.dumps(result) or "lm_eval_version" in json.dumps(result)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs Debian's chromium)")
def test_reports_open_in_headless_chromium_with_table_and_figures(tiny_run, tmp_path):
    """Issue 8: the run's HTML summary shows the table and figures; `snakemake --report` bundles them."""
    summary = tiny_run / "results" / "summary" / "report.html"
    shot = tmp_path / "summary.png"
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}",
                           "--window-size=1400,2000", f"--screenshot={shot}", summary.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
                          summary.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="comparison"' in dom and "sft_gt.tiny.arith" in dom
    assert dom.count("data:image/png;base64,") == 3, "pareto, energy-by-role and run-timeline figures inline"

    report = tmp_path / "report.html"
    snakemake("--configfile", str(TINY), "--report", str(report), cwd=tiny_run)
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile3'}",
                          "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    for category in ("1. Comparison", "2. Figures", "3. Stages"):
        assert category in dom, f"{category!r} missing from the rendered Snakemake report"


def test_self_distillation_builds_the_earlier_student_first(tmp_path):
    """Issue 7: the self-distillation teacher is an earlier experiment's model, resolved through the DAG."""
    proc = snakemake("-n", "results/models/students/selfdistill.tiny.arith.s1/final", "--configfile", str(TINY),
                     cwd=tmp_path)
    jobs = planned_jobs(proc.stdout)
    assert ("train_student", {"exp": "sft_gt.tiny.arith.s1"}) in jobs
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout)
    cache = next(b for b in blocks if re.match(r"\s*(local)?rule cache_logits:", b))
    assert "results/models/students/sft_gt.tiny.arith.s1/final" in cache, "the cache's teacher is the sft_gt student"
    train = next(b for b in blocks if re.match(r"\s*(local)?rule train_student:", b) and "selfdistill" in b)
    assert "results/models/students/sft_gt.tiny.arith.s1/final" in train, "and it is also where the student starts"


def test_compare_joins_two_runs_with_different_token_budgets(tiny_run, second_run, tmp_path):
    """`distill-bench compare` on two runs of one config that differ in the token budget."""
    second = second_run
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "distill_bench", "compare", str(tiny_run / "results"),
                           str(second / "results"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    joint = pd.read_csv(out / "comparison_of_runs.csv")
    assert set(joint.run) == {"tiny-test", "tiny-budget-3000"}
    assert set(joint.token_budget) == {1500, 3000}
    assert set(joint[joint.run == "tiny-budget-3000"].trained_tokens) == {3000}
    assert (out / "comparison_of_runs.png").stat().st_size > 10_000
