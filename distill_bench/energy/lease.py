"""Exclusive GPU leases: one OS-level lock per device UUID in a node-local directory.

Why: a GPU's energy counter is the whole device's. If two stages run on one GPU, each meter charges itself the
whole delta and the run's energy is silently overcounted. A stage that can use a GPU therefore leases its devices
before CUDA initialises: ``fcntl.flock`` on ``<lock_dir>/<uuid>.lock`` (held for the life of the process and released
by the kernel when it dies, so a SIGKILLed job never leaves a stale lease), then ``CUDA_VISIBLE_DEVICES`` is set to
the leased devices. Every lock file holds the holder's pid and stage id, so a meter that finds a foreign process on
its device can name the stage it belongs to.

The lock directory is probed before use: on a filesystem where ``flock`` is a silent no-op (some network or FUSE
mounts) two processes would both "hold" a device, so that is an error, never silent sharing.
No torch import here (this runs before CUDA may be touched).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import nvml as nvml_mod

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_flock = fcntl.flock   # module-level so a test can stand in a filesystem whose locks do not work


class LeaseError(RuntimeError):
    """A lease cannot be granted safely (bad lock directory, more devices asked for than visible)."""


def default_lock_dir() -> Path:
    """Node-local and shared by every user of the node, so two users' workflows do not share a GPU either.
    ``/tmp`` is node-local on clusters too; ``energy.lock_dir`` overrides it."""
    return Path(tempfile.gettempdir()) / "distill-bench-gpu-locks"


@dataclass
class LeasedDevice:
    index: int       # NVML index (= PCI bus order, what CUDA_DEVICE_ORDER=PCI_BUS_ID numbers)
    uuid: str


@dataclass
class Lease:
    devices: list[LeasedDevice]
    lock_dir: Path
    waited_s: float
    stage_id: str | None = None
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(d.index) for d in self.devices)

    def describe(self) -> dict[str, Any]:
        """The stage JSON's ``lease`` block."""
        return {"devices": [{"index": d.index, "uuid": d.uuid} for d in self.devices],
                "lock_dir": str(self.lock_dir), "waited_s": round(self.waited_s, 3)}

    def apply_to_environ(self, environ: Any = None) -> None:
        """Restrict CUDA to the leased devices (must happen before CUDA initialises in this process)."""
        environ = os.environ if environ is None else environ
        environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        environ["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices

    def release(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)      # closing the only descriptor drops the flock
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------ devices
def visible_gpus(nvml_module: Any = None, visible_devices: str | None | object = "env") -> list[LeasedDevice]:
    """GPUs this process may use: NVML's devices filtered by CUDA_VISIBLE_DEVICES (none when NVML is missing)."""
    reader = nvml_mod.NvmlReader(module=nvml_module, visible_devices=visible_devices).open()
    try:
        return [LeasedDevice(d.nvml_index, d.uuid) for d in reader.devices]
    finally:
        reader.close()


def visible_gpu_count(nvml_module: Any = None) -> int:
    return len(visible_gpus(nvml_module))


# ------------------------------------------------------------------------------------------------ lock dir
def _lock_path(lock_dir: Path, uuid: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in uuid)
    return lock_dir / f"{safe}{LOCK_SUFFIX}"


def _open_lock_file(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o666)     # other users of the node must be able to lock it too (umask aside)
    except OSError:
        pass
    return fd


def prepare_lock_dir(lock_dir: str | os.PathLike | None) -> Path:
    """Create the lock directory and prove that ``flock`` excludes a second holder there."""
    path = Path(lock_dir) if lock_dir else default_lock_dir()
    where = f"energy.lock_dir {str(path)!r}"
    try:
        fresh = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        if fresh and lock_dir is None:
            os.chmod(path, 0o1777)   # shared by every user, like /tmp itself
    except OSError as exc:
        raise LeaseError(f"{where}: cannot create the GPU lock directory ({exc})") from exc
    probe = path / f".probe-{os.getpid()}-{time.monotonic_ns()}"
    fd1 = fd2 = -1
    try:
        fd1 = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fd2 = os.open(probe, os.O_RDWR | os.O_CLOEXEC)
        _flock(fd1, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            _flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        else:
            raise LeaseError(f"{where}: file locks do not work on this filesystem (a second flock on a held file "
                             "succeeded), so GPU leases could not keep two stages off one device. Set "
                             "energy.lock_dir to a local directory (e.g. /tmp or $XDG_RUNTIME_DIR).")
    except LeaseError:
        raise
    except OSError as exc:
        raise LeaseError(f"{where}: cannot use file locks there ({exc}); GPU leases need a local filesystem with "
                         "working flock. Set energy.lock_dir to a local directory (e.g. /tmp).") from exc
    finally:
        for fd in (fd2, fd1):
            if fd >= 0:
                os.close(fd)
        try:
            probe.unlink()
        except OSError:
            pass
    return path


# ------------------------------------------------------------------------------------------------ acquire
def _try_lock(path: Path) -> int | None:
    fd = _open_lock_file(path)
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise LeaseError(f"flock on {path} failed: {exc}") from exc
    return fd


def _write_holder(fd: int, stage_id: str | None, dev: LeasedDevice) -> None:
    info = {"pid": os.getpid(), "stage_id": stage_id, "uuid": dev.uuid, "index": dev.index,
            "since_unix": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass   # the lock is what matters; the holder note only helps name a foreign stage


def acquire(n_gpus: int, *, stage_id: str | None = None, lock_dir: str | os.PathLike | None = None,
            nvml_module: Any = None, devices: list[LeasedDevice] | None = None, poll_s: float = 0.25,
            timeout_s: float | None = None, rule: str | None = None,
            on_wait: Callable[[float], None] | None = None) -> Lease:
    """Lease ``n_gpus`` of the visible GPUs, waiting until that many are free at once.

    All-or-nothing: a partial set is released before waiting again, so two multi-GPU stages never deadlock.
    """
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 0:
        raise LeaseError(f"GPU lease: number of GPUs must be an int >= 0; got {n_gpus!r}")
    path = prepare_lock_dir(lock_dir)
    pool = visible_gpus(nvml_module) if devices is None else list(devices)
    who = f"rule {rule!r}" if rule else f"stage {stage_id!r}" if stage_id else "this job"
    if n_gpus > len(pool):
        raise LeaseError(f"{who} asks for {n_gpus} GPU(s) but only {len(pool)} are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    t0 = time.monotonic()
    next_note = t0 + 30.0
    while True:
        held: list[tuple[LeasedDevice, int]] = []
        if n_gpus:
            for dev in pool:
                fd = _try_lock(_lock_path(path, dev.uuid))
                if fd is not None:
                    held.append((dev, fd))
                    if len(held) == n_gpus:
                        break
        if len(held) == n_gpus:
            for dev, fd in held:
                _write_holder(fd, stage_id, dev)
            return Lease(devices=[d for d, _ in held], lock_dir=path, waited_s=time.monotonic() - t0,
                         stage_id=stage_id, _fds=[fd for _, fd in held])
        for _, fd in held:
            os.close(fd)
        now = time.monotonic()
        if timeout_s is not None and now - t0 >= timeout_s:
            raise TimeoutError(f"{who}: no {n_gpus} free GPU(s) within {timeout_s:.0f} s (locks in {path})")
        if now >= next_note:
            log.info("%s waiting %.0f s for %d free GPU(s) (locks in %s)", who, now - t0, n_gpus, path)
            if on_wait is not None:
                on_wait(now - t0)
            next_note = now + 30.0
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------ holders
def holders(lock_dir: str | os.PathLike | None) -> dict[int, dict[str, Any]]:
    """pid -> holder note of every lock file (notes of dead holders included; callers match live pids)."""
    path = Path(lock_dir) if lock_dir else default_lock_dir()
    out: dict[int, dict[str, Any]] = {}
    try:
        files = list(path.glob(f"*{LOCK_SUFFIX}"))
    except OSError:
        return out
    for f in files:
        try:
            info = json.loads(f.read_text() or "{}")
            out[int(info["pid"])] = info
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


# ------------------------------------------------------------------------------------------------ jobs
_HELD: list[Lease] = []   # leases live as long as the process: the kernel drops them when it exits


def lease_for_job(n_gpus: int, *, stage_id: str | None, lock_dir: str | os.PathLike | None = None,
                  rule: str | None = None, nvml_module: Any = None) -> Lease | None:
    """Lease ``n_gpus`` devices for this process and restrict CUDA to them; None when the job needs no GPU.

    Call before anything initialises CUDA (torch may be imported, but no CUDA call made, before this).
    """
    if not n_gpus:
        return None
    got = acquire(int(n_gpus), stage_id=stage_id, lock_dir=lock_dir, rule=rule, nvml_module=nvml_module)
    got.apply_to_environ()
    _HELD.append(got)
    log.info("%s leased GPU(s) %s after waiting %.1f s", rule or stage_id, got.cuda_visible_devices, got.waited_s)
    return got


def job_gpus(resources: Any) -> int:
    """The `gpu` resource of a Snakemake job (0 when the rule declares none)."""
    try:
        value = resources.get("gpu", 0)
    except AttributeError:
        value = getattr(resources, "gpu", 0)
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0
