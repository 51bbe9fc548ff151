"""Shared-device detection: which processes outside the stage's own process tree had a CUDA context on a metered GPU
during the stage's window.

Why: NVML's energy counter and power reading are the whole device's. A stage that shared its GPU with anything else
(another stage, another user's job) was billed for that work too; the record must say so, whatever the executor
(local leases prevent it inside one workflow; SLURM with shared nodes, `distill-bench measure` and other users do
not). The sampler polls NVML's process list on its slow tick (once a second by default, not every power sample:
the query costs more than a power read).
"""
from __future__ import annotations

import os
from typing import Any

from . import lease as lease_mod
from .nvml import NvmlReader


def _parent_pid(pid: int) -> int | None:
    """Parent pid from /proc (None if the process is not visible here: gone, or in another PID namespace)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        try:
            import psutil  # type: ignore

            return int(psutil.Process(pid).ppid())
        except Exception:
            return None


def ancestry(pid: int, limit: int = 64) -> list[int] | None:
    """``pid`` and its ancestors up to init; None when ``pid`` itself is not visible in this PID namespace."""
    chain: list[int] = []
    cur: int | None = pid
    while cur is not None and cur > 1 and cur not in chain and len(chain) < limit:
        parent = _parent_pid(cur)
        if parent is None:
            return chain or None
        chain.append(cur)
        cur = parent
    return chain


class SharingTracker:
    """Accumulates, per metered device, the foreign pids seen and for how long."""

    def __init__(self, nvml: NvmlReader | None, *, own_pid: int | None = None, lock_dir: str | None = None):
        self.nvml = nvml if nvml is not None and nvml.available else None
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.lock_dir = lock_dir
        self.polls = 0
        self._last_t: float | None = None
        self._ours: set[int] = set()
        self._foreign: dict[tuple[int, str], dict[str, Any]] = {}   # (pid, device key) -> entry
        self._hidden: dict[str, set[int]] = {}                      # device -> pids not visible in our namespace
        self._saw_ours: set[str] = set()
        self.errors: dict[str, str] = {}
        self._holders: dict[int, dict] | None = None
        # per-process SM utilisation on shared devices (an estimate, never the billed figure): device -> sums
        self._util: dict[str, dict[str, float]] = {}
        self._util_seen_us: dict[str, int] = {}

    def _is_ours(self, pid: int) -> bool | None:
        if pid in self._ours:
            return True
        chain = ancestry(pid)
        if chain is None:
            return None
        if self.own_pid in chain:
            self._ours.add(pid)
            return True
        return False

    def _stage_id_of(self, pid: int) -> str | None:
        """Our stage id for a foreign pid, from the lease notes of it or an ancestor (e.g. a torchrun worker)."""
        if self._holders is None:
            self._holders = lease_mod.holders(self.lock_dir)
        for p in ancestry(pid) or [pid]:
            note = self._holders.get(p)
            if note is not None:
                return note.get("stage_id")
        return None

    def poll(self, t: float) -> None:
        """One look at every metered device's process list at window time ``t`` (seconds)."""
        if self.nvml is None:
            return
        dt = 0.0 if self._last_t is None else max(0.0, t - self._last_t)
        self._last_t = t
        self.polls += 1
        for dev in self.nvml.devices:
            try:
                pids = self.nvml.running_pids(dev)
            except Exception as exc:
                self.errors.setdefault(dev.key, f"{type(exc).__name__}: {exc}")
                continue
            for pid in pids:
                ours = self._is_ours(pid)
                if ours:
                    self._saw_ours.add(dev.key)
                    continue
                if ours is None:
                    self._hidden.setdefault(dev.key, set()).add(pid)
                key = (pid, dev.key)
                entry = self._foreign.get(key)
                if entry is None:
                    entry = {"pid": pid, "device": dev.uuid, "device_key": dev.key,
                             "stage_id": self._stage_id_of(pid) if ours is not None else None,
                             "overlap_s": 0.0, "first_seen_s": round(t, 3), "visible": ours is not None}
                    self._foreign[key] = entry
                    self._holders = None   # re-read the lease notes for the next newcomer
                entry["overlap_s"] += dt
                entry["last_seen_s"] = round(t, 3)
            if any(k[1] == dev.key for k in self._foreign):
                self._poll_utilisation(dev)

    def _poll_utilisation(self, dev) -> None:
        """SM utilisation per process since the last poll (NVML keeps a short per-process history)."""
        query = getattr(self.nvml.nvml, "nvmlDeviceGetProcessUtilization", None)
        if query is None:
            return
        try:
            samples = query(dev.handle, self._util_seen_us.get(dev.key, 0)) or []
        except Exception as exc:
            self._util.setdefault(dev.key, {"ours": 0.0, "all": 0.0, "samples": 0})["error"] = str(exc)
            return
        acc = self._util.setdefault(dev.key, {"ours": 0.0, "all": 0.0, "samples": 0})
        for smp in samples:
            sm = float(getattr(smp, "smUtil", 0) or 0)
            acc["all"] += sm
            acc["samples"] += 1
            if self._is_ours(int(smp.pid)):
                acc["ours"] += sm
            self._util_seen_us[dev.key] = max(self._util_seen_us.get(dev.key, 0), int(getattr(smp, "timeStamp", 0)))

    def attribution(self, per_device_j: dict[str, float]) -> dict[str, Any] | None:
        """Our share of each shared device's energy by SM utilisation: labelled an estimate, kept beside (never in)
        the billed figure, which stays the device's counter."""
        if not self._util:
            return None
        per = {}
        for key, acc in sorted(self._util.items()):
            share = acc["ours"] / acc["all"] if acc["all"] > 0 else None
            j = per_device_j.get(key)
            per[key] = {"our_share": share, "samples": acc["samples"],
                        "gpu_j": share * j if share is not None and j is not None else None}
            if "error" in acc:
                per[key]["error"] = acc["error"]
        total = [v["gpu_j"] for v in per.values()]
        return {"source": "estimated:per_process_utilisation", "per_device": per,
                "gpu_j": sum(total) if total and all(v is not None for v in total) else None}

    def result(self) -> dict[str, Any]:
        """The stage JSON's ``sharing`` block."""
        if self.nvml is None:
            return {"checked": False, "shared": False, "foreign_processes": [], "unreadable": "no NVML device metered",
                    "polls": 0}
        unreadable = None
        if self.errors:
            unreadable = "; ".join(f"{k}: NVML process list unreadable ({v})" for k, v in sorted(self.errors.items()))
        foreign = []
        for entry in self._foreign.values():
            # a pid outside our PID namespace is foreign only where our own pids are visible on that device
            if entry["visible"] or entry["device_key"] in self._saw_ours:
                foreign.append({**entry, "overlap_s": round(entry["overlap_s"], 3)})
        blind = sorted(k for k, pids in self._hidden.items() if pids and k not in self._saw_ours)
        if blind:
            note = (f"{', '.join(blind)}: NVML lists pids that are not in this PID namespace (container?) and none of "
                    "ours, so our processes cannot be told from others there")
            unreadable = f"{unreadable}; {note}" if unreadable else note
        checked = self.polls > 0 and not self.errors and not blind
        return {"checked": checked, "shared": bool(foreign), "foreign_processes":
                sorted(foreign, key=lambda e: (e["device_key"], e["pid"])), "unreadable": unreadable,
                "polls": self.polls}


def merge(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sharing over a stage's attempts: checked only if every attempt was, shared if any was; each foreign process
    carries its attempt number."""
    blocks = [(a.get("attempt"), a.get("sharing")) for a in attempts if a.get("sharing")]
    if not blocks:
        return {"checked": False, "shared": False, "foreign_processes": [], "unreadable": "not recorded", "polls": 0}
    foreign = []
    for number, b in blocks:
        foreign += [{**f, "attempt": f.get("attempt", number)} for f in b.get("foreign_processes") or []]
    reasons = [b["unreadable"] for _, b in blocks if b.get("unreadable")]
    return {"checked": all(b.get("checked") for _, b in blocks), "shared": any(b.get("shared") for _, b in blocks),
            "foreign_processes": foreign, "unreadable": "; ".join(dict.fromkeys(reasons)) or None,
            "polls": sum(int(b.get("polls") or 0) for _, b in blocks)}
