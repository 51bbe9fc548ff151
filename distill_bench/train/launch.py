"""Multi-GPU / multi-node student training: the train stage re-launches itself through ``torchrun``.

Why this shape: the energy meter must run once per node and see every GPU the job was given, while DDP/FSDP want
one process per GPU. So the stage process (inside its ``StageMeter``, in the Snakemake rule) does no training when
``training.gpus > 1`` or ``training.nodes > 1``: it writes the stage's arguments to a spec file and runs
``python -m torch.distributed.run --nproc-per-node=<gpus> -m distill_bench.train.launch <spec>``. Every worker runs
the stage function the spec names (``target``, "module:function": SFT/KD's ``train_student``, DPO's
``train_preferences``; HF Trainer handles DDP/FSDP from the torchrun environment) against a recording meter; rank 0 writes the records, token counts (all-reduced over ranks) and the list of every
rank's host and device to a result file, which the launching process replays into the real meter.

Multi-node (SLURM): the launching process runs ``srun --nodes=N --ntasks-per-node=1`` over the allocation; each
node's task is ``python -m distill_bench.train.launch node ...``, which opens that node's own meter
(``<stage json>.node<k>.json``, measuring that node's GPUs) around its ``torchrun``. The launching node's stage JSON
records every node's energy file under ``metrics.distributed.node_energy``.
SIGTERM/SIGUSR1 reaching the launching process are forwarded to the workers, which checkpoint and stop; the signal
is then re-delivered to the meter (stage JSON ``interrupted``), so a rerun resumes like a one-GPU run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from distill_bench.atomic import atomic_write_json
from distill_bench.energy import StageMeter
from distill_bench.train.trainer import TrainingInterrupted

RESULT_ENV = "DISTILL_BENCH_LAUNCH_RESULT"
# keep NVLink multicast off whatever the caller's environment says (it can take shared hosts' GPUs down)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DISTRIBUTED = ("ddp", "fsdp")


def inside_launch() -> bool:
    """True in a torchrun worker (so the stage trains itself instead of launching again)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(settings) -> bool:
    return (int(settings.gpus) > 1 or int(getattr(settings, "nodes", 1)) > 1) and not inside_launch()


class RecordingMeter:
    """Stands in for StageMeter inside the workers: keeps what the stage reports, for rank 0 to hand back."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.metrics: dict[str, Any] = {}
        self.primary: str | None = None

    def add_tokens(self, kind: str, n: int) -> None:
        self.tokens[kind] = self.tokens.get(kind, 0) + int(n)

    def set_primary_tokens(self, kind: str) -> None:
        self.primary = kind
        self.tokens.setdefault(kind, 0)

    def record(self, key: str, value: Any) -> None:
        json.dumps(value)
        self.metrics[str(key)] = value

    def mark_steady_state(self) -> None:  # the launching process's meter owns the window
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(spec: Path, *, nproc: int, nnodes: int = 1, node_rank: int | None = None,
                     rdzv_endpoint: str | None = None, master_port: int | None = None,
                     python: str = sys.executable) -> list[str]:
    """The torchrun command line for one node (``node_rank``/``rdzv_endpoint`` only when nnodes > 1)."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={int(nproc)}", f"--nnodes={int(nnodes)}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("training.nodes > 1 needs a rendezvous endpoint (the first node of the allocation)")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=distill-bench"]
        if node_rank is not None:
            cmd.append(f"--node-rank={int(node_rank)}")
    else:
        cmd += ["--standalone"] if master_port is None else [f"--master-port={int(master_port)}"]
    return cmd + ["-m", "distill_bench.train.launch", "worker", str(spec)]


def slurm_nodes_command(spec: Path, *, nproc: int, nnodes: int, energy_json: Path,
                        python: str = sys.executable) -> list[str]:
    """srun over the allocation: one task per node, each under its own meter (see module docstring)."""
    head = os.environ.get("SLURM_LAUNCH_NODE_IPADDR") or socket.gethostname()
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        try:
            head = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                                  text=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            pass
    return ["srun", f"--nodes={int(nnodes)}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", python, "-m",
            "distill_bench.train.launch", "node", str(spec), f"--nproc={int(nproc)}", f"--nnodes={int(nnodes)}",
            f"--rdzv={head}:29500", f"--energy-json={energy_json}"]


def worker_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(SAFE_ENV)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_forwarding_signals(cmd: Sequence[str], env: Mapping[str, str]) -> tuple[int, int | None]:
    """Run ``cmd`` in its own process group; SIGTERM/SIGUSR1 are passed on to it. Returns (rc, signal seen)."""
    proc = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True)
    seen: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        seen.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGUSR1):
            previous[s] = signal.signal(s, forward)
    try:
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return rc, (seen[0] if seen else None)


def launch_train(*, meter, settings, target: str, stage_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """From inside the stage meter: train on ``settings.gpus`` GPUs per node (x ``settings.nodes``) via torchrun.

    Every worker calls the stage function ``target`` ("module:function", named rather than imported: the stage
    modules sit above this one) with ``stage_kwargs`` and a recording meter."""
    out = Path(stage_kwargs["out_dir"])
    work = out / "launch"
    work.mkdir(parents=True, exist_ok=True)
    result = work / "result.json"
    result.unlink(missing_ok=True)
    spec = work / "spec.json"
    atomic_write_json(spec, {"target": target, "stage_kwargs": dict(stage_kwargs), "result": str(result)}, sort_keys=True,
                      allow_nan=True, default=str)
    env = worker_env()
    env[RESULT_ENV] = str(result)
    nodes = int(getattr(settings, "nodes", 1))
    if nodes > 1:
        if "SLURM_JOB_ID" not in os.environ:
            raise RuntimeError(f"training.nodes={nodes} needs a SLURM allocation of {nodes} nodes (no SLURM_JOB_ID)")
        cmd = slurm_nodes_command(spec, nproc=settings.gpus, nnodes=nodes,
                                  energy_json=Path(getattr(meter, "out_json", work / "energy.json")))
    else:
        cmd = torchrun_command(spec, nproc=settings.gpus, master_port=_free_port())
    if meter is not None:
        meter.record("launch_command", " ".join(cmd))
    rc, signum = _run_forwarding_signals(cmd, env)
    payload = json.loads(result.read_text()) if result.is_file() else None
    if payload is not None and meter is not None:
        _replay(meter, payload)
    if signum is not None:
        signal.raise_signal(signum)   # the meter's own handler marks the stage interrupted
        raise TrainingInterrupted(f"distributed training interrupted by signal {signum}; rerun to resume")
    if rc != 0:
        cause = f": {payload['error']}" if payload and payload.get("error") else ""
        raise RuntimeError(f"distributed training failed (exit {rc}){cause}; command {' '.join(cmd)}; "
                           "see the worker log above")
    if payload is None or "summary" not in payload:
        raise RuntimeError(f"distributed training ended without a result file {result}")
    return payload["summary"]


def _replay(meter, payload: Mapping[str, Any]) -> None:
    for kind, n in payload.get("tokens", {}).items():
        meter.add_tokens(kind, int(n))
    if payload.get("primary"):
        meter.set_primary_tokens(payload["primary"])
    for key, value in payload.get("metrics", {}).items():
        meter.record(key, value)
    if "distributed" not in payload:
        return   # a failed worker's partial result
    dist = dict(payload["distributed"])
    out_json = getattr(meter, "out_json", None)
    if out_json is not None and int(dist.get("nodes", 1)) > 1:
        dist["node_energy"] = sorted(str(p) for p in Path(out_json).parent.glob(Path(out_json).stem + ".node*.json"))
    meter.record("distributed", dist)


def _rank_inventory() -> dict[str, Any]:
    """Every rank's host and device, gathered to all ranks (a collective: call on every rank)."""
    import torch
    import torch.distributed as dist

    me: dict[str, Any] = {"rank": int(os.environ.get("RANK", 0)), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                          "host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        me.update({"device": f"cuda:{i}", "name": props.name, "uuid": str(getattr(props, "uuid", "")),
                   "total_memory_gib": round(props.total_memory / 2**30, 1)})
    else:
        me["device"] = "cpu"
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1, "nodes": 1, "ranks": [me]}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    hosts = sorted({r["host"] for r in everyone})
    return {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "nodes": len(hosts),
            "hosts": hosts, "ranks": sorted(everyone, key=lambda r: r["rank"])}


def worker_main(spec_path: str) -> int:
    """One torchrun worker: the spec's train stage against a RecordingMeter; rank 0 writes the result."""
    spec = json.loads(Path(spec_path).read_text())
    module, func = spec["target"].split(":")
    stage = getattr(importlib.import_module(module), func)
    rec = RecordingMeter()
    result = Path(os.environ.get(RESULT_ENV) or spec["result"])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = stage(meter=rec, **spec["stage_kwargs"])
    except BaseException as exc:
        if rank0:   # the launching stage names the cause and still bills the tokens trained before it
            atomic_write_json(result, {"error": f"{type(exc).__name__}: {exc}", "tokens": rec.tokens,
                                       "primary": rec.primary, "metrics": rec.metrics},
                              sort_keys=True, allow_nan=True, default=str)
        raise
    inventory = _rank_inventory()
    if rank0:
        atomic_write_json(result,
                          {"summary": summary, "tokens": rec.tokens, "primary": rec.primary, "metrics": rec.metrics,
                           "distributed": inventory}, sort_keys=True, allow_nan=True, default=str)
    return 0


def node_main(argv: Sequence[str]) -> int:
    """One node of a multi-node run: this node's meter around its torchrun (launched by srun)."""
    ap = argparse.ArgumentParser(prog="distill_bench.train.launch node")
    ap.add_argument("spec")
    ap.add_argument("--nproc", type=int, required=True)
    ap.add_argument("--nnodes", type=int, required=True)
    ap.add_argument("--rdzv", required=True)
    ap.add_argument("--energy-json", required=True)
    a = ap.parse_args(argv)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    base = Path(a.energy_json)
    out = base.with_name(f"{base.stem}.node{node}.json")
    cmd = torchrun_command(Path(a.spec), nproc=a.nproc, nnodes=a.nnodes, node_rank=node, rdzv_endpoint=a.rdzv)
    with StageMeter(stage="train_student_node", stage_id=f"{base.stem}.node{node}", role="student",
                    out_json=out, is_measuring_process=True) as meter:
        meter.record("node_rank", node)
        rc, _ = _run_forwarding_signals(cmd, worker_env())
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "worker":
        return worker_main(argv[1])
    if argv and argv[0] == "node":
        return node_main(argv[1:])
    raise SystemExit("usage: python -m distill_bench.train.launch worker SPEC | node SPEC --nproc N --nnodes M "
                     "--rdzv HOST:PORT --energy-json PATH")


if __name__ == "__main__":
    sys.exit(main())
