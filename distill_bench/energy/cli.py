"""`distill-bench measure | idle | env`: meter any command, measure idle power, snapshot the environment."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .settings import POLICIES, EnergySettings


def _settings(ns: argparse.Namespace) -> EnergySettings:
    d = {}
    for opt, key in (("policy", "policy"), ("interval", "sample_interval_s"), ("cpu_tdp_w", "cpu_tdp_w"),
                     ("idle_json", "idle_json"), ("env_json", "environment_json"),
                     ("snapshot_interval", "snapshot_interval_s"), ("country", "country_iso_code")):
        value = getattr(ns, opt, None)
        if value is not None:
            d[key] = value
    if getattr(ns, "no_codecarbon", False):
        d["codecarbon"] = False
    return EnergySettings.from_dict(d)


def _terminal_sends_sigint_to_child() -> bool:
    """Ctrl-C on a terminal reaches the whole foreground group: the child already has it, don't send it twice."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def measure_main(argv: list[str]) -> int:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        opts, cmd = argv[:i], argv[i + 1:]
    else:
        opts, cmd = argv, []
    p = argparse.ArgumentParser(prog="distill-bench measure",
                                description="Run CMD as a child process inside the energy meter and write a stage "
                                            "JSON. The exit code is the child's. The child may write "
                                            "{\"kind\": count, ...} to $DISTILL_BENCH_TOKENS_FILE to report tokens.",
                                usage="distill-bench measure --stage NAME --out FILE.json [options] -- CMD ARGS...")
    p.add_argument("--stage", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--role", default="setup", help="setup|data|teacher|student|eval|idle (default setup)")
    p.add_argument("--stage-id", default=None, help="unique id in the run (default: the stage name)")
    p.add_argument("--pipeline", default="shared")
    p.add_argument("--experiment", default=None)
    p.add_argument("--artifact", default=None)
    p.add_argument("--primary-tokens", default=None, help="token kind used for tokens/s and J/token")
    p.add_argument("--policy", choices=POLICIES, default=None)
    p.add_argument("--interval", type=float, default=None, help="power sampling period in seconds (default 0.1)")
    p.add_argument("--snapshot-interval", type=float, default=None)
    p.add_argument("--cpu-tdp-w", type=float, default=None)
    p.add_argument("--country", default=None, help="ISO-3 country code for CodeCarbon")
    p.add_argument("--idle-json", default=None)
    p.add_argument("--env-json", default=None)
    p.add_argument("--no-codecarbon", action="store_true")
    p.add_argument("--gpus", type=int, default=0,
                   help="lease this many GPUs exclusively (waits until free) and run CMD on them (default 0: "
                        "meter the visible GPUs without a lease)")
    p.add_argument("--lock-dir", default=None, help="GPU lease lock directory (default <tmp>/distill-bench-gpu-locks)")
    ns = p.parse_args(opts)
    if not cmd:
        p.error("no command given: put it after `--`")
    try:
        settings = _settings(ns)
    except ValueError as exc:
        p.error(str(exc))
    from .lease import LeaseError, lease_for_job
    from .meter import StageMeter

    try:   # before the meter opens NVML on the devices it will measure
        lease = lease_for_job(ns.gpus, stage_id=ns.stage_id or ns.stage, lock_dir=ns.lock_dir)
    except LeaseError as exc:
        p.error(str(exc))
    if ns.lock_dir:
        settings.lock_dir = ns.lock_dir
    meter = StageMeter(stage=ns.stage, stage_id=ns.stage_id or ns.stage, role=ns.role, pipeline=ns.pipeline,
                       experiment=ns.experiment, artifact=ns.artifact, out_json=ns.out, settings=settings,
                       install_signal_handlers=False, lease=lease.describe() if lease is not None else None)
    tokens_file = ns.out.with_name(ns.out.stem + ".tokens.json")
    meter.start()   # raises before the child starts if the output directory is unwritable
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if child is not None and child.poll() is None:
            if signum == signal.SIGINT and _terminal_sends_sigint_to_child():
                return
            child.send_signal(signum)

    prev = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            if tokens_file.exists():
                tokens_file.unlink()
            child = subprocess.Popen(cmd, env={**os.environ, "DISTILL_BENCH_TOKENS_FILE": str(tokens_file)})
        except OSError as exc:
            meter.record("command", cmd)
            meter.stop("failed", error=f"could not start command: {exc}")
            print(f"distill-bench measure: could not start {cmd[0]!r}: {exc}", file=sys.stderr)
            return 127
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
    code = rc if rc >= 0 else 128 - rc
    meter.record("command", cmd)
    meter.record("exit_code", code)
    if rc < 0:
        meter.record("child_signal", signal.Signals(-rc).name)
    if tokens_file.exists():
        try:
            counts = json.loads(tokens_file.read_text())
            for kind, n in counts.items():
                meter.add_tokens(kind, n)
        except (ValueError, TypeError, OSError) as exc:
            meter.record("tokens_file_error", f"{tokens_file.name}: {exc}")
    if ns.primary_tokens:
        meter.set_primary_tokens(ns.primary_tokens)
    if received or rc < 0:
        names = [signal.Signals(s).name for s in received] or [signal.Signals(-rc).name]
        status, error = "interrupted", f"{'/'.join(names)}; command exit code {code}"
    elif code != 0:
        status, error = "failed", f"command exited with code {code}"
    else:
        status, error = "complete", None
    rec = meter.stop(status, error=error)
    if rec is not None:
        e = rec["energy"]
        print(f"distill-bench measure: {status} in {rec['duration_s']:.2f} s; total {e['total_j']:.1f} J "
              f"(gpu {e['gpu_j']:.1f} [{e['sources']['gpu']}], cpu {e['cpu_j']:.1f} [{e['sources']['cpu']}], "
              f"ram {e['ram_j']:.2f} [{e['sources']['ram']}]) -> {ns.out}", file=sys.stderr)
    return code


def idle_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="distill-bench idle", description="Measure idle power per device.")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seconds", required=True, type=float)
    p.add_argument("--interval", type=float, default=None)
    p.add_argument("--cpu-tdp-w", type=float, default=None)
    ns = p.parse_args(argv)
    try:
        settings = _settings(ns)
    except ValueError as exc:
        p.error(str(exc))
    from .idle import measure_idle

    rec = measure_idle(ns.out, ns.seconds, settings)
    c = rec["components"]
    print(f"idle over {rec['seconds']:.1f} s: gpu {c['gpu']['w']:.1f} W [{c['gpu']['source']}], "
          f"cpu {c['cpu']['w']:.2f} W [{c['cpu']['source']}], ram {c['ram']['w']:.2f} W [{c['ram']['source']}]"
          f" -> {ns.out}", file=sys.stderr)
    return 0


def env_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="distill-bench env", description="Write the environment snapshot JSON.")
    p.add_argument("--out", required=True, type=Path)
    ns = p.parse_args(argv)
    from .environment import write_environment_snapshot

    write_environment_snapshot(ns.out)
    print(f"environment snapshot -> {ns.out}", file=sys.stderr)
    return 0
