"""CPU and RAM estimates for machines without readable RAPL (labelled, never silent).

CPU model ("estimated:cpu_tdp_x_utilisation"):
    E_cpu = W_per_thread x CPU-seconds used by this process tree during the stage
    W_per_thread = TDP_per_package x packages / logical CPUs
i.e. each fully busy logical CPU draws its share of the package TDP, an idle one draws nothing (the estimate is
attributable, dynamic energy; its idle baseline is ~0 W by construction). TDP comes from ``energy.cpu_tdp_w``, else
CodeCarbon's CPU table matched on the model name, else CodeCarbon's fallback of 4 W per logical CPU.

RAM model ("estimated:ram_0.375W_per_GB"): 0.375 W per GB of resident memory of this process tree (CodeCarbon's
historical constant), integrated over the stage from the sampler's RSS readings.
"""
from __future__ import annotations

import os
import re
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

CPU_SOURCE = "estimated:cpu_tdp_x_utilisation"
RAM_SOURCE = "estimated:ram_0.375W_per_GB"
RAM_W_PER_GB = 0.375
FALLBACK_W_PER_THREAD = 4.0

try:  # psutil ships with CodeCarbon; /proc fallback below keeps us working without it
    import psutil  # type: ignore
except Exception:  # pragma: no cover
    psutil = None


TREE_REFRESH_S = 5.0
_tree_lock = threading.Lock()
_tree_cache: dict[str, Any] = {"pid": None, "at": -float("inf"), "procs": []}


def _tree_processes():
    """This process and its live descendants; the descendant list is re-read at most every ``TREE_REFRESH_S``.

    Listing descendants reads every ``/proc/<pid>/stat`` on the machine (psutil's parent map). Beside a CPU-bound
    Python main thread each of those reads waits for the GIL, so listing on every sample stalled the meter's
    sampler for seconds (and with it the ledger that keeps a SIGKILLed attempt on the bill). CPU seconds are
    cumulative per process, so a child found one refresh late is still counted in full; only the RSS integral
    misses it for that interval.
    """
    now = time.monotonic()
    with _tree_lock:
        if _tree_cache["pid"] != os.getpid() or now - _tree_cache["at"] >= TREE_REFRESH_S:
            me = psutil.Process()
            try:
                kids = me.children(recursive=True)
            except psutil.Error:
                kids = []
            _tree_cache.update(pid=os.getpid(), at=now, procs=[me, *kids])
        return list(_tree_cache["procs"])


def process_tree_cpu_seconds() -> float:
    """user+system CPU seconds of this process and all live descendants, plus reaped children's totals.

    Reaped children are counted through their parents' ``children_user/children_system`` fields, so a child that
    exits between two readings moves from "live" to "reaped" without being lost or counted twice.
    """
    if psutil is None:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    total = 0.0
    for p in _tree_processes():
        try:
            c = p.cpu_times()
            total += c.user + c.system + getattr(c, "children_user", 0.0) + getattr(c, "children_system", 0.0)
        except psutil.Error:
            continue
    return total


def process_tree_rss_bytes() -> int:
    if psutil is None:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0
    total = 0
    for p in _tree_processes():
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def logical_cpus() -> int:
    return os.cpu_count() or 1


@lru_cache(maxsize=1)
def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def cpu_packages() -> int:
    try:
        ids = {line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("physical id")}
        return max(1, len(ids))
    except OSError:
        return 1


def _normalise(name: str) -> str:
    name = re.sub(r"\((R|TM|tm|r)\)", " ", name)
    name = re.sub(r"@.*$", " ", name)
    name = re.sub(r"\b(CPU|Processor|Intel|AMD|\d+-Core)\b", " ", name, flags=re.I)
    return " ".join(name.split()).lower()


@lru_cache(maxsize=8)
def lookup_tdp(model: str) -> float | None:
    """Package TDP from CodeCarbon's CPU table (exact normalised name, else the longest table name inside ours)."""
    try:
        import importlib.resources as ir

        text = (ir.files("codecarbon") / "data" / "hardware" / "cpu_power.csv").read_text()
    except Exception:
        return None
    target = _normalise(model)
    best: tuple[int, float] | None = None
    for line in text.splitlines()[1:]:
        name, _, tdp = line.rpartition(",")
        try:
            watts = float(tdp)
        except ValueError:
            continue
        norm = _normalise(name)
        if not norm:
            continue
        if norm == target:
            return watts
        if len(norm) >= 4 and re.search(rf"(^|\s){re.escape(norm)}($|\s)", target):
            if best is None or len(norm) > best[0]:
                best = (len(norm), watts)
    return best[1] if best else None


def cpu_power_model(tdp_w: float | None = None) -> dict[str, Any]:
    """The numbers behind the CPU estimate, recorded in every stage JSON so the estimate can be redone."""
    n = logical_cpus()
    packages = cpu_packages()
    model = cpu_model_name()
    if tdp_w is not None:
        tdp, tdp_source = float(tdp_w), "config:energy.cpu_tdp_w"
    else:
        found = lookup_tdp(model)
        if found is not None:
            tdp, tdp_source = found, "codecarbon_cpu_table"
        else:
            tdp, tdp_source = FALLBACK_W_PER_THREAD * n / packages, f"fallback_{FALLBACK_W_PER_THREAD:g}W_per_thread"
    return {"cpu_model": model, "logical_cpus": n, "packages": packages, "tdp_w_per_package": tdp,
            "tdp_source": tdp_source, "w_per_busy_thread": tdp * packages / n}
