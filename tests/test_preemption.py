"""Preemption: SIGTERM (SLURM time limit / preemption) mid-stage, then a rerun, at the stage level.

Each stage runs through ``distill_bench.stages.run_named_stage`` -- the path a Snakemake job takes -- in a child
process that the test kills with SIGTERM mid-work. The rerun must finish the work from the checkpoint / partial
chunks, produce what an uninterrupted run produces, and bill both attempts in one stage JSON.

Tolerance for training: the resumed run restores optimizer, scheduler and RNG state, so on CPU fp32 it reproduces the
uninterrupted run up to float reordering: final loss within 1e-4 absolute and every weight within 1e-5.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from distill_bench.energy.meter import ledger_path_for  # noqa: E402
from distill_bench.stages import run_named_stage  # noqa: E402
from conftest import save_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOL = 1e-4
WEIGHT_TOL = 1e-5
ENERGY = {"policy": "measured", "sample_interval_s": 0.05, "codecarbon": False, "snapshot_interval_s": 30}
TRAINING = dict(token_budget=600, max_length=96, batch_size=4, grad_accum=1, lr=3e-3, weight_decay=0.0,
                warmup_ratio=0.1, lr_scheduler="cosine", precision="fp32", save_steps=2, num_threads=1,
                stale_checkpoints="refuse")
SYNTHETIC = dict(backend="hf", batch_size=2, max_new_tokens=6, temperature=0.0, top_p=1.0, samples_per_prompt=1,
                 n_prompts=32)

# The child slows each training step / generation chunk a little (pure sleep: results unchanged) so that the
# SIGTERM surely lands mid-work, and reports progress the parent waits for before killing it.
CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    args = json.loads(sys.argv[1])
    progress = Path(args["progress"])
    if args["name"] == "train_student":
        from transformers.trainer_callback import CallbackHandler
        orig = CallbackHandler.on_step_end
        def on_step_end(self, a, state, control):
            out = orig(self, a, state, control)
            progress.write_text(str(state.global_step))
            time.sleep(args["delay"])
            return out
        CallbackHandler.on_step_end = on_step_end
    else:
        import distill_bench.generation.chunked as syn   # the loop the synthetic stage generates through
        orig = syn.generate
        calls = []
        def generate(*a, **k):
            if calls:
                progress.write_text(str(len(calls)))
                time.sleep(args["delay"])
            calls.append(1)
            return orig(*a, **k)
        syn.generate = generate
    from distill_bench.stages import run_named_stage
    run_named_stage(args["name"], out_json=args["out_json"], meter_args=args["meter_args"], kwargs=args["kwargs"])
""")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny embedded dataset, tokenizer and initial model (also the 'teacher' for generation)."""
    from distill_bench.data.io import save_dataset_dir
    from distill_bench.data.task import generate_task
    from distill_bench.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("preempt")
    dsd = generate_task(seed=3, n_train=60, n_eval=4, min_steps=2, max_steps=2, max_operand=9)
    data = save_dataset_dir(dsd, root / "data" / "arith", {"name": "arith", "source": "embedded"})
    texts = [t for row in dsd["train"] for t in (row["prompt"], row["response"])]
    tok = train_tokenizer(texts, 96, root / "tokenizer")
    init = save_tiny_model(tok, root / "init")
    return {"root": root, "data": str(data), "tokenizer": str(root / "tokenizer"), "init": str(init)}


def train_kwargs(env, out_dir, **training):
    return dict(pipeline="sft_gt", dataset=env["data"], tokenizer=env["tokenizer"], init_model=env["init"],
                out_dir=str(out_dir), training={**TRAINING, **training}, seed=0)


def gen_kwargs(env, out_dir):
    return dict(teacher=env["init"], tokenizer=env["tokenizer"], dataset=env["data"], out_dir=str(out_dir),
                synthetic=SYNTHETIC, shard=0, num_shards=1, seed=0)


def meter_args(stage_id, role):
    return {"stage_id": stage_id, "role": role, "pipeline": "sft_gt" if role == "student" else "shared",
            "experiment": "sft_gt.tiny.arith" if role == "student" else None, "energy": ENERGY}


def run_in_process(name, out_json, stage_id, role, kwargs):
    return run_named_stage(name, out_json=out_json, meter_args=meter_args(stage_id, role), kwargs=kwargs)


def run_and_sigterm(name, out_json, stage_id, role, kwargs, progress: Path, at: int, delay: float,
                    timeout: float = 240, sig: int = signal.SIGTERM,
                    sigint_ignored: bool = False) -> subprocess.CompletedProcess:
    """Run the stage in a child, send it ``sig`` once it reports progress >= ``at``, return the finished process.
    ``sigint_ignored``: the child starts with SIGINT ignored, as jobs a non-interactive shell puts in the background."""
    args = {"name": name, "out_json": str(out_json), "meter_args": meter_args(stage_id, role), "kwargs": kwargs,
            "progress": str(progress), "delay": delay}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored
                            else None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if int(progress.read_text() or 0) >= at:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, f"child ended before it could be interrupted:\n{proc.communicate()[0][-3000:]}"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    proc.stdout_text = out
    return proc


def check_two_attempts(record: dict, primary: str, expected_total: int) -> None:
    """Two attempts (interrupted, complete); top-level energy and tokens are their sums."""
    assert record["status"] == "complete"
    attempts = record["attempts"]
    assert [a["status"] for a in attempts] == ["interrupted", "complete"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert any(s in (attempts[0]["error"] or "") for s in ("SIGTERM", "143"))  # 143 = 128 + SIGTERM
    for key in ("total_j", "gpu_j", "cpu_j", "ram_j"):
        assert record["energy"][key] == pytest.approx(sum(a["energy"][key] for a in attempts), rel=1e-9, abs=1e-12)
    assert all(a["energy"]["total_j"] > 0 for a in attempts)
    assert record["energy"]["attempts_summed"] == 2
    per_attempt = [a["tokens"].get(primary, 0) for a in attempts]
    assert all(n > 0 for n in per_attempt), per_attempt  # each attempt bills only the work it did
    assert sum(per_attempt) == record["tokens"]["counts"][primary] == expected_total
    assert record["duration_s"] == pytest.approx(sum(a["duration_s"] for a in attempts))


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def train_runs(env):
    """An uninterrupted reference run and a run SIGTERMed after its 3rd optimizer step (checkpoints every 2)."""
    from distill_bench.train.trainer import FINGERPRINT

    root = env["root"] / "train"
    ref_json = root / "energy" / "ref.json"
    run_in_process("train_student", ref_json, "student.train.ref", "student", train_kwargs(env, root / "ref"))
    run_json = root / "energy" / "run.json"
    proc = run_and_sigterm("train_student", run_json, "student.train.run", "student",
                           train_kwargs(env, root / "run"), root / "progress", at=3, delay=0.15)
    ckpts = root / "run" / "checkpoints"
    snapshot = root / "snapshot"  # the interrupted state, before the rerun consumes it
    shutil.copytree(root / "run", snapshot)
    return {"root": root, "ref_json": ref_json, "run_json": run_json, "proc": proc, "ckpts": ckpts,
            "snapshot": snapshot, "fingerprint": FINGERPRINT}


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_sigterm_mid_training_checkpoints_and_records_interrupted_attempt(train_runs):
    proc = train_runs["proc"]
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout_text[-3000:]
    snap = train_runs["snapshot"]
    assert sorted(p.name for p in (snap / "checkpoints").glob("checkpoint-*")), "no checkpoint saved on SIGTERM"
    assert not (snap / "final").exists()
    rec = json.loads(train_runs["run_json"].read_text())
    assert rec["status"] == "interrupted" and len(rec["attempts"]) == 1
    assert 0 < rec["tokens"]["counts"]["trained_tokens"] < TRAINING["token_budget"]


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["interactive", "sigint_ignored_at_start"])
def test_ctrl_c_mid_training_checkpoints_like_sigterm(env, tmp_path, sigint_ignored):
    """SIGINT (Ctrl-C) stops at the next optimizer step with a checkpoint, so a rerun resumes instead of restarting:
    periodic saves are off here, so the only checkpoint is the one the signal asked for. A process that started with
    SIGINT ignored (a background job of a script) still checkpoints on an explicit SIGINT and is billed as
    interrupted, not failed."""
    run_json = tmp_path / "energy" / "run.json"
    proc = run_and_sigterm("train_student", run_json, "student.train.ctrl_c", "student",
                           train_kwargs(env, tmp_path / "run", save_steps=1000), tmp_path / "progress", at=2,
                           delay=0.15, sig=signal.SIGINT, sigint_ignored=sigint_ignored)
    assert proc.returncode != 0, proc.stdout_text[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert ckpts, f"no checkpoint saved on SIGINT:\n{proc.stdout_text[-3000:]}"
    rec = json.loads(run_json.read_text())
    assert rec["status"] == "interrupted", (rec.get("error"), proc.stdout_text[-3000:])
    assert 0 < rec["tokens"]["counts"]["trained_tokens"] < TRAINING["token_budget"]


def test_rerun_after_sigterm_completes_matching_uninterrupted_loss_and_bills_both_attempts(env, train_runs):
    import torch

    root = train_runs["root"]
    run_in_process("train_student", train_runs["run_json"], "student.train.run", "student",
                   train_kwargs(env, root / "run"))
    ref = json.loads(train_runs["ref_json"].read_text())
    rec = json.loads(train_runs["run_json"].read_text())
    check_two_attempts(rec, "trained_tokens", TRAINING["token_budget"])
    assert rec["metrics"]["resumed_from_step"] > 0
    assert rec["metrics"]["steps"] == ref["metrics"]["steps"]
    assert abs(rec["metrics"]["final_loss"] - ref["metrics"]["final_loss"]) <= LOSS_TOL
    wr, wf = _weights(root / "ref" / "final"), _weights(root / "run" / "final")
    assert wr.keys() == wf.keys()
    worst = max(float((wr[k] - wf[k]).abs().max()) for k in wr)
    assert worst <= WEIGHT_TOL, f"resumed weights differ from the uninterrupted run by up to {worst}"
    assert all(torch.isfinite(v).all() for v in wf.values())


def test_resume_against_checkpoint_of_other_config_is_refused_at_stage_level(env, train_runs, tmp_path):
    from distill_bench.train.trainer import CheckpointMismatchError

    out = tmp_path / "other"
    shutil.copytree(train_runs["snapshot"], out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    out_json = tmp_path / "energy" / "other.json"
    with pytest.raises(CheckpointMismatchError, match="lr|settings"):
        run_in_process("train_student", out_json, "student.train.other", "student",
                       train_kwargs(env, out, lr=1e-3))
    rec = json.loads(out_json.read_text())
    assert rec["status"] == "failed" and "CheckpointMismatchError" in rec["error"]
    # refused, not mixed: the foreign checkpoints are untouched and no model was produced
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not (out / "final").exists()


# ---------------------------------------------------------------------------------------------- generation
def _shard_rows(shard_dir):
    from distill_bench.synthetic.stage import read_shard

    ds, info = read_shard(shard_dir)
    return ds.to_list(), info


def test_sigterm_mid_generation_then_rerun_after_outputs_deleted_resumes_chunks_and_keeps_ledger(env):
    root = env["root"] / "gen"
    ref_json = root / "energy" / "ref.json"
    run_in_process("generate_synthetic", ref_json, "teacher.generate.ref", "teacher", gen_kwargs(env, root / "ref"))
    ref_rows, ref_info = _shard_rows(root / "ref")
    assert len(ref_rows) == SYNTHETIC["n_prompts"]

    run_json = root / "energy" / "run.json"
    proc = run_and_sigterm("generate_synthetic", run_json, "teacher.generate.run", "teacher",
                           gen_kwargs(env, root / "run"), root / "progress", at=1, delay=0.5)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout_text[-3000:]
    partial = root / "run.partial"
    chunks_done = sorted(partial.glob("chunk-*.jsonl"))
    assert 1 <= len(chunks_done) < 4, "SIGTERM must land mid-generation (4 chunks of 8 prompts)"
    assert not (root / "run").exists()
    first = json.loads(run_json.read_text())
    assert first["status"] == "interrupted"

    # Snakemake deletes a failed job's declared outputs (the stage JSON among them) before the rerun;
    # the attempt ledger beside them is what keeps the interrupted attempt on the bill
    ledger = ledger_path_for(run_json)
    assert ledger.is_file() and ledger.parent.name == ".attempts"
    run_json.unlink()

    run_in_process("generate_synthetic", run_json, "teacher.generate.run", "teacher", gen_kwargs(env, root / "run"))
    rows, info = _shard_rows(root / "run")
    assert rows == ref_rows, "resumed generation differs from the uninterrupted run"
    assert info["resumed_chunks"] == len(chunks_done)
    assert not partial.exists()
    rec = json.loads(run_json.read_text())
    check_two_attempts(rec, "generated_tokens", ref_info["generated_tokens"])
    assert rec["metrics"]["resumed_chunks"] == len(chunks_done)
    # each attempt charged only the prompts it prefilled; together exactly the uninterrupted run's input
    assert sum(a["tokens"]["input_tokens"] for a in rec["attempts"]) == ref_info["input_tokens"]
