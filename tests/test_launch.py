"""Multi-process training through distill_bench.train.launch: 2 gloo processes on CPU vs 1 process, equal global batch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from distill_bench.train.launch import SAFE_ENV, inside_launch, torchrun_command, wants_launch, worker_env  # noqa: E402
from distill_bench.train.trainer import TrainSettings  # noqa: E402
from conftest import FakeMeter, arith_pairs, save_pairs_dataset, save_tiny_model, train_arith_tokenizer  # noqa: E402

# fp32 on CPU: DDP all-reduces (averages) gradients and the loss normaliser counts all ranks, so the only
# difference to one process is the order of float sums
LOSS_RTOL = 1e-4


def _setup(tmp_path):
    from distill_bench.models.tokenizer import load_tokenizer

    tok = load_tokenizer(train_arith_tokenizer(tmp_path / "tok", 32, 100))
    data = save_pairs_dataset(tmp_path / "data", arith_pairs(32))
    save_tiny_model(tok, tmp_path / "init")
    return dict(pipeline="sft_gt", dataset=str(data), tokenizer=str(tmp_path / "tok"),
                init_model=str(tmp_path / "init"), seed=0)


def test_two_gloo_processes_give_one_process_loss_curve_and_exact_tokens(tmp_path, monkeypatch):
    from distill_bench.train.stage import train_student as stage

    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    common = _setup(tmp_path)
    # 32 examples, the budget covers 16 of them: 4 global batches of 4 (1 process x 4, or 2 processes x 2)
    base = dict(token_budget=None, max_length=64, grad_accum=1, lr=3e-3, warmup_ratio=0.0,
                lr_scheduler="constant", precision="fp32", save_steps=200, logging_steps=1)
    from distill_bench.models.stage import encode_split, load_split
    from distill_bench.models.tokenizer import load_tokenizer
    from distill_bench.train.budget import build_budgeted_dataset, trained_positions

    examples, _ = encode_split(load_tokenizer(common["tokenizer"]), load_split(common["dataset"], "train"), 64)
    one_epoch = sum(trained_positions(e["completion_mask"]) for e in examples)
    stream, _ = build_budgeted_dataset(examples, one_epoch, seed=0)
    base["token_budget"] = sum(trained_positions(e["completion_mask"]) for e in stream[:16])

    one = FakeMeter()
    s1 = stage(meter=one, out_dir=str(tmp_path / "one"), training={**base, "batch_size": 4, "gpus": 1}, **common)
    two = FakeMeter()
    s2 = stage(meter=two, out_dir=str(tmp_path / "two"), training={**base, "batch_size": 2, "gpus": 2}, **common)

    assert s1["steps"] == s2["steps"] == 4
    c1, c2 = [loss for _, loss in s1["loss_curve"]], [loss for _, loss in s2["loss_curve"]]
    assert len(c1) == len(c2) == 4
    assert c1 == pytest.approx(c2, rel=LOSS_RTOL)
    # exact tokens: summed over both ranks, equal to the budget, reported once to the launching meter
    assert one.tokens["trained_tokens"] == two.tokens["trained_tokens"] == base["token_budget"]
    assert two.metrics["trained_tokens_total"] == base["token_budget"]
    dist = two.metrics["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert [r["rank"] for r in dist["ranks"]] == [0, 1] and dist["hosts"]
    assert "torch.distributed.run" in two.metrics["launch_command"]
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


def test_worker_failure_is_an_error_naming_the_workers_cause_and_the_command(tmp_path, monkeypatch):
    from distill_bench.train.stage import train_student as stage

    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    common = _setup(tmp_path)
    common["init_model"] = str(tmp_path / "init")
    # max_length too small for every example -> each worker raises; the launcher reports the failed command
    training = dict(token_budget=10, max_length=4, batch_size=2, gpus=2)
    with pytest.raises(RuntimeError, match=r"distributed training failed \(exit \d+\): ValueError: .*max_length=4.*"
                                           r"command .*torch.distributed.run"):
        stage(meter=FakeMeter(), out_dir=str(tmp_path / "bad"), training=training, **common)


def test_torchrun_command_single_and_multi_node():
    single = torchrun_command(Path("s.json"), nproc=2, master_port=1234)
    assert "--nproc-per-node=2" in single and "--master-port=1234" in single and single[-2:] == ["worker", "s.json"]
    multi = torchrun_command(Path("s.json"), nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="n1:29500")
    assert "--nnodes=2" in multi and "--node-rank=1" in multi and "--rdzv-endpoint=n1:29500" in multi
    with pytest.raises(ValueError, match="rendezvous"):
        torchrun_command(Path("s.json"), nproc=4, nnodes=2)


def test_launch_only_outside_workers_and_multicast_stays_off(monkeypatch):
    s = TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "gpus": 2})
    for var in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert wants_launch(s) and not wants_launch(TrainSettings.from_dict({"token_budget": 5, "max_length": 8}))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert inside_launch() and not wants_launch(s)
    env = worker_env({"NCCL_NVLS_ENABLE": "1"})
    assert all(env[k] == v for k, v in SAFE_ENV.items())


def test_settings_reject_bad_distributed_and_attention_keys():
    with pytest.raises(ValueError, match="training.distributed"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "distributed": "zero3"})
    with pytest.raises(ValueError, match="training.attn_implementation"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "attn_implementation": "flash"})
    with pytest.raises(ValueError, match="training.nodes"):
        TrainSettings.from_dict({"token_budget": 5, "max_length": 8, "nodes": 0})


def test_final_save_gathers_fsdp_weights_on_every_rank_and_writes_on_rank_zero(tmp_path):
    """Under FSDP the full-weight gather is a collective: every rank joins it, only rank 0 writes."""
    from types import SimpleNamespace

    from distill_bench.train.trainer import save_final_model

    calls, saved = [], []

    class Model:
        def save_pretrained(self, path, state_dict=None):
            saved.append(state_dict)
            Path(path).mkdir(parents=True, exist_ok=True)

    for rank in (0, 1):
        trainer = SimpleNamespace(is_fsdp_enabled=True, model=Model(), model_wrapped="wrapped",
                                  args=SimpleNamespace(process_index=rank),
                                  accelerator=SimpleNamespace(get_state_dict=lambda m, r=rank: calls.append((r, m))
                                                              or {"w": r}))
        save_final_model(trainer, tmp_path / f"final{rank}", None)
    assert calls == [(0, "wrapped"), (1, "wrapped")]
    assert saved == [{"w": 0}] and (tmp_path / "final0").is_dir() and not (tmp_path / "final1").exists()
