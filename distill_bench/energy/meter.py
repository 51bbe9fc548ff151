"""StageMeter: one measured unit of work -> one stage JSON (schema_version 1), written atomically.

Energy per component comes from the best source available (NVML energy counter, RAPL) and otherwise from a labelled
estimate; the policy picks what ``total_j`` sums. Re-running a stage whose previous attempt was interrupted or failed
appends an attempt, and the top-level figures are the sums over attempts, so preempted work stays on the bill.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import numbers
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from distill_bench.atomic import atomic_write_json, check_writable_dir

from . import cpu_estimate, nvml as nvml_mod, rapl as rapl_mod, sharing as sharing_mod
from .settings import EnergySettings
from .validate import SCHEMA_VERSION, load_json, validate_stage_dict

log = logging.getLogger(__name__)

ROLES = ("setup", "data", "teacher", "student", "eval", "idle")
PIPELINES = ("sft_gt", "kd", "sft", "dpo", "selfdistill", "continued", "shared")
KWH = 3.6e6
_TOKEN_KIND = re.compile(r"^[A-Za-z0-9_]+$")


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_local_rank_zero() -> bool:
    """Only one meter per node measures: local rank 0 (torchrun's LOCAL_RANK, else SLURM_LOCALID)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(var)
        if value not in (None, ""):
            try:
                return int(value) == 0
            except ValueError:
                return True
    return True


def timeline_path_for(out_json: Path) -> Path:
    return out_json.with_name(out_json.stem + ".timeline.csv")


def ledger_path_for(out_json: Path) -> Path:
    """Copy of the latest record kept outside the workflow's declared outputs (see _load_previous_attempts)."""
    return out_json.parent / ".attempts" / out_json.name


def ledger_lock_path_for(out_json: Path) -> Path:
    return out_json.parent / ".attempts" / (out_json.name + ".lock")


def _attempt_key(a: dict) -> str:
    return str(a.get("attempt_key") or f"#{a.get('attempt')}")


def _alive_elsewhere(a: dict) -> bool:
    """True if the attempt's process is another live process on this host (a concurrent writer, not a dead one)."""
    pid = a.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or a.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def codecarbon_dir_for(out_json: Path) -> Path:
    return out_json.with_name(out_json.stem + ".codecarbon")


class StageInterrupted(Exception):
    """A stage stopped on a signal after saving its progress (a trainer's checkpoint-and-stop, say). The meter
    records such an attempt as interrupted, not failed, also where the re-delivered signal did not end the process
    itself (SIGINT is ignored in jobs a non-interactive shell starts in the background)."""


class StageMeter:
    """Context manager (or .start()/.stop(status)) measuring one stage; see module docstring."""

    def __init__(self, *, stage: str, stage_id: str, role: str, pipeline: str = "shared",
                 experiment: str | None = None, artifact: str | None = None, out_json: str | os.PathLike,
                 settings: EnergySettings | dict | None = None, devices: Any = None,
                 is_measuring_process: bool | None = None, nvml_module: Any = None,
                 rapl_root: str | os.PathLike = rapl_mod.DEFAULT_ROOT, install_signal_handlers: bool = True,
                 lease: dict | None = None, output_accepted: Callable[[dict], bool | None] | None = None):
        if not stage or not isinstance(stage, str):
            raise ValueError(f"stage must be a non-empty string; got {stage!r}")
        if not stage_id or not isinstance(stage_id, str):
            raise ValueError(f"stage_id must be a non-empty string; got {stage_id!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}; got {pipeline!r}")
        self.stage, self.stage_id, self.role, self.pipeline = stage, stage_id, role, pipeline
        self.experiment, self.artifact = experiment, artifact
        self.out_json = Path(out_json)
        self.settings = settings if isinstance(settings, EnergySettings) else EnergySettings.from_dict(settings)
        self.measuring = is_local_rank_zero() if is_measuring_process is None else bool(is_measuring_process)
        self._devices_arg = devices
        self._nvml_module = nvml_module
        self._rapl_root = rapl_root
        self._install_handlers = install_signal_handlers
        self.lease = lease                 # the GPU lease this process holds (energy.lease.Lease.describe())
        # did the workflow accept the output of a previous complete record? (None: cannot tell). A complete attempt
        # whose output was never accepted (Snakemake interrupted right after it) was redone: it stays on the bill.
        self._output_accepted = output_accepted
        self._ledger_fd: int | None = None
        self._ledger_depth = 0
        self._ledger_lock_error: str | None = None
        self._lock = threading.RLock()
        self.tokens: dict[str, int] = {}
        self.primary: str | None = None
        self.metrics: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}
        self._started = False
        self._stopped = False
        self._t0: float | None = None
        self._t_end: float | None = None
        self._signal_received: int | None = None
        self._prev_handlers: dict[int, Any] = {}
        self._steady: dict[str, Any] | None = None
        self.status: str | None = None
        self.record_dict: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ public API
    def add_tokens(self, kind: str, n: int) -> None:
        if not isinstance(kind, str) or not _TOKEN_KIND.match(kind):
            raise ValueError(f"token kind must match [A-Za-z0-9_]+; got {kind!r}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"add_tokens({kind!r}, n): n must be an int (exact count); got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"add_tokens({kind!r}, n): n must be >= 0; got {n}")
        with self._lock:
            self.tokens[kind] = self.tokens.get(kind, 0) + int(n)

    def set_primary_tokens(self, kind: str) -> None:
        if not isinstance(kind, str) or not _TOKEN_KIND.match(kind):
            raise ValueError(f"token kind must match [A-Za-z0-9_]+; got {kind!r}")
        with self._lock:
            self.primary = kind
            self.tokens.setdefault(kind, 0)

    def record(self, key: str, value: Any) -> None:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meter.record({key!r}): value is not JSON-serialisable ({exc})") from None
        with self._lock:
            self.metrics[str(key)] = value

    def record_provenance(self, *, config_hash: str | None = None, input_hashes: dict | None = None, **extra) -> None:
        """Config hash and input content hashes of the stage (provenance block of the stage JSON)."""
        with self._lock:
            if config_hash is not None:
                self.provenance["config_hash"] = config_hash
            if input_hashes is not None:
                self.provenance.setdefault("input_hashes", {}).update(input_hashes)
            self.provenance.update(extra)

    def mark_steady_state(self) -> None:
        """From now on also report steady-state throughput and J/token (e.g. after warm-up / compilation)."""
        if not self._started or self._stopped or not self.measuring:
            return
        nvml_mod.cuda_synchronize()
        with self._lock:
            self._steady = {"t": time.monotonic(), "tokens": dict(self.tokens), "energy": self._read_components()}

    @property
    def elapsed_s(self) -> float:
        if self._t0 is None:
            return 0.0
        end = self._t_end if self._t_end is not None else time.monotonic()
        return end - self._t0

    def __enter__(self) -> "StageMeter":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.stop("complete")
        elif issubclass(exc_type, KeyboardInterrupt) or (
                issubclass(exc_type, SystemExit) and exc is not None and exc.code not in (0, None)):
            self.stop("interrupted", error=f"{exc_type.__name__}{': ' + str(exc) if str(exc) else ''}")
        elif issubclass(exc_type, SystemExit):
            self.stop("complete")
        elif issubclass(exc_type, StageInterrupted):
            self.stop("interrupted", error=f"{exc_type.__name__}: {exc}")
        else:
            self.stop("failed", error=f"{exc_type.__name__}: {exc}")
        return False

    # ------------------------------------------------------------------------------------------------ start
    def start(self) -> "StageMeter":
        if self._started:
            raise RuntimeError("StageMeter already started")
        self._started = True
        if not self.measuring:
            self._t0 = time.monotonic()
            return self
        check_writable_dir(self.out_json.parent, "stage JSON output")
        self.errors: list[str] = []
        self.idle = self._load_idle()
        # readers
        self.nvml = nvml_mod.NvmlReader(module=self._nvml_module, devices=self._devices_arg).open()
        zones, rapl_error = rapl_mod.discover(self._rapl_root)
        self.rapl_error = rapl_error
        self.cpu_model = cpu_estimate.cpu_power_model(self.settings.cpu_tdp_w)
        self.timeline = timeline_path_for(self.out_json)
        # codecarbon first: its startup (seconds on some hosts) then stays outside our window
        self.codecarbon = None
        if self.settings.codecarbon:
            from .codecarbon_adapter import CodeCarbonAdapter

            self.codecarbon = CodeCarbonAdapter(output_dir=codecarbon_dir_for(self.out_json),
                                                country_iso_code=self.settings.country_iso_code,
                                                project_name=self.stage_id)
            self.codecarbon.start()
        nvml_mod.cuda_synchronize()
        self.sharing = sharing_mod.SharingTracker(self.nvml, lock_dir=self.settings.lock_dir)
        self.attempt_key = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        with self._ledger_locked():   # numbering and the first write are atomic w.r.t. other meters of this stage
            self._prev_attempts = self._load_previous_attempts()
            self.attempt_no = max((int(a.get("attempt") or 0) for a in self._prev_attempts), default=0) + 1
            self.start_time = utcnow()
            # every baseline is read here, as the window opens (RAPL too: CodeCarbon's start-up is not ours)
            self.rapl = rapl_mod.RaplAccumulator(zones) if zones else None
            self._t0 = time.monotonic()
            self._last_snapshot = self._last_ledger = self._t0
            self._e0_gpu = self.nvml.read_energy_j() if self.nvml.available else {}
            for key, value in self._e0_gpu.items():
                if isinstance(value, Exception):
                    self.errors.append(f"NVML start counter read failed on {key}: {value}")
            self._cpu0 = cpu_estimate.process_tree_cpu_seconds()
            self.sampler = self._make_sampler()
            self.sampler.start()
            if self._install_handlers:
                self._install_signal_handlers()
            self._write(status="running")
        return self

    def _make_sampler(self):
        from .sampler import Sampler

        return Sampler(nvml=self.nvml, rapl=self.rapl, interval_s=self.settings.sample_interval_s,
                       timeline_path=self.timeline, attempt=self.attempt_no, t0=self._t0,
                       append=bool(self._prev_attempts), on_tick=self._maybe_snapshot, sharing=self.sharing)

    @contextlib.contextmanager
    def _ledger_locked(self):
        """Exclusive lock on this stage's attempt ledger (threads via the RLock, processes via flock), so two
        processes metering the same stage never overwrite each other's attempt."""
        with self._lock:
            if self._ledger_depth == 0 and self._ledger_lock_error is None:
                try:
                    if self._ledger_fd is None:
                        path = ledger_lock_path_for(self.out_json)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        self._ledger_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    fcntl.flock(self._ledger_fd, fcntl.LOCK_EX)
                except OSError as exc:
                    # never fail a stage over it, but say that concurrent writers were not excluded
                    self._ledger_lock_error = f"attempt ledger lock unavailable ({exc}); concurrent writers unguarded"
                    self._note(self._ledger_lock_error)
            self._ledger_depth += 1
            try:
                yield
            finally:
                self._ledger_depth -= 1
                if self._ledger_depth == 0 and self._ledger_fd is not None and self._ledger_lock_error is None:
                    try:
                        fcntl.flock(self._ledger_fd, fcntl.LOCK_UN)
                    except OSError:
                        pass

    def _read_ledger(self) -> dict | None:
        """The newest copy of this stage's record: the ledger (written every few seconds), else the stage JSON."""
        ledger = ledger_path_for(self.out_json)
        source = ledger if ledger.exists() else self.out_json
        if not source.exists():
            return None
        try:
            return json.loads(source.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            aside = source.with_name(source.name + f".unreadable-{int(time.time())}")
            try:
                os.replace(source, aside)
            except OSError:
                pass
            log.warning("previous stage JSON %s unreadable (%s); moved to %s", source, exc, aside)
            return None

    def _load_previous_attempts(self) -> list[dict]:
        # Snakemake deletes the declared outputs of a failed job (and of an incomplete one before rerunning it),
        # so the attempt ledger beside them is what keeps preempted work on the bill.
        old = self._read_ledger()
        if not old or old.get("stage_id") != self.stage_id:
            return []
        attempts = [dict(a) for a in old.get("attempts") or []]
        if old.get("status") == "complete" and not any(a.get("status") == "running" and _alive_elsewhere(a)
                                                       for a in attempts):
            accepted = self._output_accepted(old) if self._output_accepted is not None else None
            if accepted is not False:
                return []
            for a in attempts:
                if a.get("status") == "complete" and not a.get("discarded"):
                    a["discarded"] = ("finished, but the workflow never accepted its output (interrupted before it "
                                      "was recorded), so the work was redone; its energy stays on the bill")
        for a in attempts:
            if a.get("status") == "running" and not _alive_elsewhere(a):   # died without a final write (SIGKILL)
                a["status"] = "interrupted"
                a["error"] = (a.get("error") or "") + ("process died without a final write; energy up to its last "
                                                       "ledger snapshot")
        return attempts

    def _other_attempts(self) -> list[dict]:
        """Attempts of this stage other than ours, as the ledger holds them now (a concurrent meter may have added
        or finished one since we started)."""
        old = self._read_ledger()
        mine = self.attempt_key
        if old and old.get("stage_id") == self.stage_id and any(_attempt_key(a) == mine
                                                                  for a in old.get("attempts") or []):
            return [a for a in old["attempts"] if _attempt_key(a) != mine]
        return list(self._prev_attempts)

    def _load_idle(self) -> dict | None:
        if not self.settings.idle_json:
            return None
        return load_json(self.settings.idle_json, "idle")

    # ------------------------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._prev_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._prev_handlers.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass
        self._prev_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        prev = self._prev_handlers.get(signum, signal.SIG_DFL)
        if prev == signal.SIG_IGN:
            return
        self._signal_received = signum
        if callable(prev):
            # e.g. Python's SIGINT handler (raises KeyboardInterrupt) or a trainer's checkpoint-and-stop handler;
            # leave an honest record first in case the process is killed before the meter stops.
            try:
                self._write(status="interrupted")
            except Exception:
                pass
            prev(signum, frame)
            return
        raise SystemExit(128 + signum)   # default action would kill us; unwind so the meter records it

    # ------------------------------------------------------------------------------------------------ readings
    def _gpu_energy(self, final: bool) -> tuple[dict[str, float], dict[str, str]]:
        """Per-device GPU joules and source labels, at this moment."""
        per: dict[str, float] = {}
        src: dict[str, str] = {}
        if not self.nvml.available:
            return per, src
        now = self.nvml.read_energy_j()
        for dev in self.nvml.devices:
            integ = self.sampler.gpu_power.get(dev.key)
            integ_j = integ.total if integ is not None else 0.0
            # power samples that kept coming cover the whole window; once power reads fail too, only a lower bound
            integ_live = dev.key not in self.sampler.errors
            start = self._e0_gpu.get(dev.key)
            end = now.get(dev.key)
            if dev.has_counter and isinstance(start, float) and isinstance(end, float):
                per[dev.key], src[dev.key] = max(0.0, end - start), nvml_mod.COUNTER
                continue
            if dev.has_counter and final:
                bad = end if isinstance(end, Exception) else start
                msg = f"NVML energy counter read failed on {dev.key}: {bad}"
                if msg not in self.errors:
                    self.errors.append(msg)
            if integ is not None and integ.n >= 2 and integ_live:
                per[dev.key], src[dev.key] = integ_j, nvml_mod.POWER_INTEGRATION
            elif integ is not None and integ.n >= 2:
                per[dev.key], src[dev.key] = integ_j, nvml_mod.PARTIAL
            else:
                per[dev.key], src[dev.key] = 0.0, nvml_mod.UNAVAILABLE
        return per, src

    def _read_components(self, final: bool = False) -> dict[str, Any]:
        """Measured/estimated components (before policy) at this moment: {gpu, cpu, ram, per_device, per_device_src}."""
        per, per_src = self._gpu_energy(final)
        if per_src:
            gpu_src = max(per_src.values(), key=lambda s: nvml_mod.SOURCE_RANK[s])
        else:
            gpu_src = nvml_mod.UNAVAILABLE
        if self.rapl is not None:
            self.rapl.poll()
            cpu_j, cpu_src = self.rapl.joules("package") or 0.0, rapl_mod.SOURCE
        else:
            cpu_s = max(0.0, cpu_estimate.process_tree_cpu_seconds() - self._cpu0)
            cpu_j, cpu_src = cpu_s * self.cpu_model["w_per_busy_thread"], cpu_estimate.CPU_SOURCE
        dram = self.rapl.joules("dram") if self.rapl is not None else None
        if dram is not None:
            ram_j, ram_src = dram, rapl_mod.SOURCE
        else:
            ram_j, ram_src = self.sampler.ram_gb_seconds() * cpu_estimate.RAM_W_PER_GB, cpu_estimate.RAM_SOURCE
        return {"gpu": (float(sum(per.values(), 0.0)), gpu_src), "cpu": (cpu_j, cpu_src), "ram": (ram_j, ram_src),
                "per_device": per, "per_device_src": per_src}

    def _idle_w(self, comp: str, source: str) -> float | None:
        """Idle power for a component, only when the idle baseline was measured the same way."""
        if self.idle is None:
            return None
        if comp == "gpu":
            if not source.startswith("measured:") or not self.nvml.available:
                return None
            by_uuid = {v.get("uuid"): v["w"] for v in self.idle.get("gpu_per_device_w", {}).values()}
            total = 0.0
            for dev in self.nvml.devices:
                if dev.uuid not in by_uuid:
                    self._note(f"idle baseline has no entry for {dev.key} ({dev.uuid}); GPU net energy not computed")
                    return None
                total += by_uuid[dev.uuid]
            return total
        entry = self.idle.get("components", {}).get(comp)
        if entry is None or entry.get("source") != source:
            self._note(f"idle baseline for {comp} was measured as {entry and entry.get('source')!r}, "
                       f"stage as {source!r}; {comp} net energy not computed")
            return None
        return float(entry["w"])

    def _note(self, msg: str) -> None:
        if msg not in self.errors:
            self.errors.append(msg)

    # ------------------------------------------------------------------------------------------------ record
    def _shared_devices(self, sharing: dict) -> set[str]:
        return {f["device_key"] for f in sharing.get("foreign_processes") or [] if f.get("device_key")}

    def _unreadable_devices(self) -> list[dict[str, Any]]:
        """Devices NVML stopped answering for during the window: which, and why."""
        out = []
        for dev in self.nvml.devices:
            reasons = [m for m in self.errors if m.startswith("NVML") and f" on {dev.key}:" in m]
            err = self.sampler.errors.get(dev.key)
            if err:
                reasons.append(f"power samples failed: {err}")
            if reasons:
                out.append({"device": dev.key, "uuid": dev.uuid, "reason": "; ".join(reasons)})
        return out

    def _energy_block(self, comps: dict[str, Any], duration: float, cc: dict | None,
                      sharing: dict | None = None) -> dict[str, Any]:
        policy = self.settings.policy
        shared = self._shared_devices(sharing or {})
        if shared:   # the device's counter also counted someone else's work: say so in every GPU label
            per_src = {k: (v + nvml_mod.SHARED_MARKER if k in shared else v)
                       for k, v in comps["per_device_src"].items()}
            gpu_j, gpu_src = comps["gpu"]
            comps = {**comps, "per_device_src": per_src, "gpu": (gpu_j, gpu_src + nvml_mod.SHARED_MARKER)}
        chosen = {k: comps[k] for k in ("gpu", "cpu", "ram")}
        if policy == "codecarbon":
            if cc and cc.get("energy_kwh") is not None and not cc.get("error"):
                chosen = {"gpu": ((cc.get("gpu_energy_kwh") or 0.0) * KWH, "codecarbon:gpu"),
                          "cpu": ((cc.get("cpu_energy_kwh") or 0.0) * KWH, "codecarbon:cpu"),
                          "ram": ((cc.get("ram_energy_kwh") or 0.0) * KWH, "codecarbon:ram")}
            elif cc is not None:
                self._note("policy 'codecarbon' but CodeCarbon gave no figures; totals use the measured components")
        components = {}
        for name, (j, src) in chosen.items():
            idle_w = self._idle_w(name, src) if src != nvml_mod.UNAVAILABLE else None
            net = None
            if self.idle is not None:
                net = j - idle_w * duration if idle_w is not None else j
            components[name] = {"j": j, "source": src, "idle_w": idle_w, "net_j": net}
        included = ("gpu",) if policy == "gpu_only" else ("gpu", "cpu", "ram")
        total = sum(components[c]["j"] for c in included)
        if self.idle is not None:
            net_total = sum(components[c]["net_j"] for c in included)
            idle_total = sum(components[c]["idle_w"] or 0.0 for c in included)
        else:
            net_total = idle_total = None
        block = {"gpu_j": components["gpu"]["j"], "cpu_j": components["cpu"]["j"], "ram_j": components["ram"]["j"],
                 "total_j": total, "total_kwh": total / KWH, "net_j": net_total, "idle_w": idle_total,
                 "policy": policy, "included": list(included),
                 "sources": {c: components[c]["source"] for c in components},
                 "per_device_j": dict(comps["per_device"]), "per_device_source": dict(comps["per_device_src"]),
                 "components": components, "errors": list(self.errors),
                 "unreadable_devices": self._unreadable_devices()}
        if policy != "measured":
            block["measured_components"] = {c: {"j": comps[c][0], "source": comps[c][1]} for c in ("gpu", "cpu", "ram")}
        return block

    def _attempt_record(self, status: str, error: str | None, final: bool, cc: dict | None) -> dict[str, Any]:
        duration = self.elapsed_s
        comps = self._final_comps if final and self._final_comps is not None else self._read_components()
        sharing = self.sharing.result()
        energy = self._energy_block(comps, duration, cc, sharing)
        if sharing["shared"]:
            attribution = self.sharing.attribution(energy["per_device_j"])
            if attribution is not None:
                sharing["attribution"] = attribution
        co2 = None
        if cc and not cc.get("error") and cc.get("energy_kwh") and cc.get("emissions_kg") is not None:
            co2 = energy["total_kwh"] * cc["emissions_kg"] / cc["energy_kwh"]   # CodeCarbon's intensity x our total
        steady = None
        if self._steady is not None and self.primary is not None:
            s = self._steady
            dt = (self._t_end or time.monotonic()) - s["t"]
            dtok = self.tokens.get(self.primary, 0) - s["tokens"].get(self.primary, 0)
            included = energy["included"]
            now_j = sum(comps[c][0] for c in included)
            then_j = sum(s["energy"][c][0] for c in included)
            dj = max(0.0, now_j - then_j)
            steady = {"start_offset_s": s["t"] - self._t0, "duration_s": dt, "tokens": dtok, "j": dj,
                      "tokens_per_s": dtok / dt if dt > 0 else None, "j_per_token": dj / dtok if dtok > 0 else None,
                      "energy_basis": "measured components" + (" (gpu only)" if included == ["gpu"] else "")}
        return {"attempt": self.attempt_no, "attempt_key": self.attempt_key, "start_time": self.start_time,
                "end_time": utcnow(), "duration_s": duration, "status": status, "error": error,
                "host": socket.gethostname(), "pid": os.getpid(), "energy": energy, "tokens": dict(self.tokens),
                "co2_kg": co2, "codecarbon": cc, "steady_state": steady, "lease": self.lease, "sharing": sharing}

    def _build(self, status: str, error: str | None = None, final: bool = False, cc: dict | None = None) -> dict:
        current = self._attempt_record(status, error, final, cc)
        attempts = sorted(self._other_attempts() + [current], key=lambda a: int(a.get("attempt") or 0))
        total = _sum_energy([a["energy"] for a in attempts], self.settings.policy)
        tokens: dict[str, int] = {}
        for a in attempts:
            for k, v in a["tokens"].items():
                tokens[k] = tokens.get(k, 0) + v
        duration = sum(a["duration_s"] for a in attempts)
        prim = tokens.get(self.primary) if self.primary else None
        co2s = [a.get("co2_kg") for a in attempts]
        summary = self.sampler.power_summary()
        record = {
            "schema_version": SCHEMA_VERSION, "stage": self.stage, "stage_id": self.stage_id, "role": self.role,
            "pipeline": self.pipeline, "experiment": self.experiment, "artifact": self.artifact,
            "status": status, "error": error, "attempts": attempts,
            "start_time": attempts[0]["start_time"], "end_time": current["end_time"], "duration_s": duration,
            "tokens": {"counts": tokens, "primary": self.primary},
            "energy": total,
            "power": {"gpu_avg_w": summary["gpu_avg_w"], "gpu_peak_w": summary["gpu_peak_w"],
                      "per_device": summary["per_device"], "timeline": self.timeline.name,
                      "sample_interval_s": self.settings.sample_interval_s, "samples": self.sampler.samples,
                      "sampler_errors": dict(self.sampler.errors)},
            "throughput": {"primary": self.primary,
                           "tokens_per_s": prim / duration if prim and duration > 0 else None,
                           "j_per_token": total["total_j"] / prim if prim else None,
                           "steady_state": current["steady_state"]},
            "co2_kg": sum(c for c in co2s if c is not None) if any(c is not None for c in co2s) else None,
            "codecarbon": _sum_codecarbon([a.get("codecarbon") for a in attempts]) if self.settings.codecarbon else None,
            "metrics": dict(self.metrics),
            "devices": {"gpu": self.nvml.describe(),
                        "cpu": {"rapl": [z.name for z in self.rapl.zones] if self.rapl else None,
                                "rapl_error": self.rapl_error, "estimate_model": self.cpu_model}},
            "hosts": sorted({a.get("host") for a in attempts if a.get("host")}),
            "environment": self.settings.environment_json,
            "lease": self.lease,
            "sharing": sharing_mod.merge(attempts),
            "provenance": dict(self.provenance),
            "settings": self.settings.to_dict(),
        }
        if duration < 60:
            record["notes"] = ["window shorter than 60 s: energy figures are noisy"]
        return record

    def _write(self, status: str, error: str | None = None, final: bool = False, cc: dict | None = None) -> dict:
        with self._ledger_locked():
            record = self._build(status, error, final, cc)
            problem = None
            try:
                validate_stage_dict(record, str(self.out_json))
            except ValueError as exc:
                problem = exc
            atomic_write_json(self.out_json, record)   # written even if invalid: energy must not be lost
            atomic_write_json(ledger_path_for(self.out_json), record)
            if problem is not None:
                raise problem
            return record

    def _write_ledger(self) -> None:
        """Cheap frequent snapshot: the ledger only, no schema check, so a SIGKILLed attempt loses seconds."""
        with self._ledger_locked():
            atomic_write_json(ledger_path_for(self.out_json), self._build(status="running"), fsync=False,
                              indent=None)   # compact: the C encoder, a few ms

    def _maybe_snapshot(self) -> None:
        now = time.monotonic()
        if self._stopped:
            return
        try:
            if now - self._last_snapshot >= self.settings.snapshot_interval_s:
                self._last_snapshot = self._last_ledger = now
                self._write(status="running")
            elif now - self._last_ledger >= self.settings.ledger_interval_s:
                self._last_ledger = now
                self._write_ledger()
        except Exception as exc:
            self.sampler.errors.setdefault("snapshot", f"{type(exc).__name__}: {exc}")

    _final_comps: dict | None = None

    # ------------------------------------------------------------------------------------------------ stop
    def stop(self, status: str = "complete", error: str | None = None) -> dict | None:
        """End the window and write the final stage JSON; returns it (None for a non-measuring process)."""
        if status not in ("complete", "interrupted", "failed"):
            raise ValueError(f"stop status must be complete|interrupted|failed; got {status!r}")
        if not self._started or self._stopped:
            return self.record_dict
        if not self.measuring:
            self._stopped = True
            self._t_end = time.monotonic()
            return None
        if self._signal_received is not None and status == "complete":
            status, error = "interrupted", error or f"signal {signal.Signals(self._signal_received).name} received"
        try:
            nvml_mod.cuda_synchronize()
            with self._lock:
                self._stopped = True
            self.sampler.stop()
            with self._lock:
                self._final_comps = self._read_components(final=True)   # close readings at the window end
                self._t_end = time.monotonic()    # after the last sample and counter read: all lie in the window
            cc = self.codecarbon.stop() if self.codecarbon is not None else None
            self.status = status
            self.record_dict = self._write(status=status, error=error, final=True, cc=cc)
            return self.record_dict
        finally:
            self._restore_signal_handlers()
            self.nvml.close()
            if self._ledger_fd is not None:
                try:
                    os.close(self._ledger_fd)
                except OSError:
                    pass
                self._ledger_fd = None


def _sum_energy(blocks: list[dict], policy: str) -> dict[str, Any]:
    """Top-level energy = sums over attempts (sources/idle from the latest attempt)."""
    last = blocks[-1]
    if len(blocks) == 1:
        return last
    out = json.loads(json.dumps(last))
    for key in ("gpu_j", "cpu_j", "ram_j", "total_j", "total_kwh"):
        out[key] = sum(b[key] for b in blocks)
    nets = [b["net_j"] for b in blocks]
    out["net_j"] = sum(nets) if all(n is not None for n in nets) else None
    per: dict[str, float] = {}
    for b in blocks:
        for k, v in b["per_device_j"].items():
            per[k] = per.get(k, 0.0) + v
    out["per_device_j"] = per
    for comp in ("gpu", "cpu", "ram"):
        c = out["components"][comp]
        c["j"] = sum(b["components"][comp]["j"] for b in blocks)
        cn = [b["components"][comp]["net_j"] for b in blocks]
        c["net_j"] = sum(cn) if all(n is not None for n in cn) else None
        srcs = {b["components"][comp]["source"] for b in blocks}
        if len(srcs) > 1:
            out.setdefault("errors", []).append(f"{comp} source differs between attempts: {sorted(srcs)}")
    out["errors"] = sorted({e for b in blocks for e in b.get("errors", [])})
    out["attempts_summed"] = len(blocks)
    return out


def _sum_codecarbon(blocks: list[dict | None]) -> dict | None:
    blocks = [b for b in blocks if b]
    if not blocks:
        return None
    out = dict(blocks[-1])
    if len(blocks) > 1:
        for key in ("emissions_kg", "energy_kwh", "cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh", "duration_s"):
            vals = [b.get(key) for b in blocks]
            out[key] = sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None
        out["attempts_summed"] = len(blocks)
    return out


def run_stage(*, stage: str, stage_id: str, role: str, pipeline: str = "shared", experiment: str | None = None,
              artifact: str | None = None, out_json: str | os.PathLike, settings: EnergySettings | dict | None = None,
              fn: Callable[..., Any], energy_settings: EnergySettings | dict | None = None, lease: dict | None = None,
              output_accepted: Callable[[dict], bool | None] | None = None, **kwargs: Any) -> Any:
    """Open a StageMeter, call ``fn(meter=meter, **kwargs)`` and return its result.

    Exceptions mark the stage 'failed' and re-raise; SIGTERM/SIGINT and ``StageInterrupted`` mark it 'interrupted',
    then the process exits as it would have (exit 143 / KeyboardInterrupt / the exception). ``energy_settings`` is
    accepted as an alias of ``settings``.
    """
    if settings is None:
        settings = energy_settings
    with StageMeter(stage=stage, stage_id=stage_id, role=role, pipeline=pipeline, experiment=experiment,
                    artifact=artifact, out_json=out_json, settings=settings, lease=lease,
                    output_accepted=output_accepted) as meter:
        return fn(meter=meter, **kwargs)
