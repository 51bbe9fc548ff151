"""NVML reader: energy counters and power samples for the GPUs visible to this job.

The ``pynvml`` module is injectable (``module=``) so tests run with a fake; nothing here imports torch.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

COUNTER = "measured:nvml_energy_counter"
POWER_INTEGRATION = "measured:nvml_power_integration"
PARTIAL = "measured:nvml_partial_until_failure"
UNAVAILABLE = "unavailable"
# appended to a GPU source label when another process used the device during the stage's window
SHARED_MARKER = "+shared_device"
# worst-first ordering used to label a component made of several devices
SOURCE_RANK = {COUNTER: 0, POWER_INTEGRATION: 1, PARTIAL: 2, UNAVAILABLE: 3}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class GpuDevice:
    key: str                 # "gpu<nvml index>", stable on a node whatever CUDA_VISIBLE_DEVICES says
    nvml_index: int
    uuid: str
    name: str
    handle: Any
    requested: list[str] = field(default_factory=list)   # CUDA_VISIBLE_DEVICES tokens that selected it
    mig: bool = False
    mig_uuids: list[str] = field(default_factory=list)
    has_counter: bool = True
    counter_error: str | None = None

    def describe(self) -> dict[str, Any]:
        d = {"key": self.key, "nvml_index": self.nvml_index, "uuid": self.uuid, "name": self.name,
             "requested": list(self.requested), "mig": self.mig, "energy_counter": self.has_counter}
        if self.mig:
            d["mig_uuids"] = list(self.mig_uuids)
            d["note"] = "MIG: energy and power are the parent GPU's, shared by every MIG instance on it"
        if self.counter_error:
            d["counter_error"] = self.counter_error
        return d


def parse_visible_devices(spec: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES -> tokens (None = all devices). Like CUDA, parsing stops at the first invalid token."""
    if spec is None:
        return None
    tokens = []
    for raw in spec.split(","):
        tok = raw.strip()
        if not tok:
            break
        if tok.lstrip("-").isdigit():
            if int(tok) < 0:
                break
            tokens.append(str(int(tok)))
        elif tok.startswith(("GPU-", "MIG-")):
            tokens.append(tok)
        else:
            break
    return tokens


class NvmlReader:
    """Opens NVML, resolves the job's devices, reads energy counters and power/clock/utilisation samples."""

    def __init__(self, module: Any = None, visible_devices: str | None | object = "env", devices: Any = None):
        self._module = module
        if devices is not None:
            self._spec = ",".join(str(d) for d in devices) if not isinstance(devices, str) else devices
        elif visible_devices == "env":
            self._spec = os.environ.get("CUDA_VISIBLE_DEVICES")
        else:
            self._spec = visible_devices  # type: ignore[assignment]
        self.nvml: Any = None
        self.devices: list[GpuDevice] = []
        self.error: str | None = None
        self.notes: list[str] = []

    # --- lifecycle -------------------------------------------------------------------------------------------
    def open(self) -> "NvmlReader":
        try:
            self.nvml = self._module if self._module is not None else importlib.import_module("pynvml")
        except Exception as exc:  # pynvml not installed
            self.error = f"pynvml not importable: {exc}"
            return self
        try:
            self.nvml.nvmlInit()
        except Exception as exc:
            self.error = f"nvmlInit failed: {exc}"
            self.nvml = None
            return self
        try:
            self.devices = self._resolve()
        except Exception as exc:
            self.error = f"NVML device enumeration failed: {exc}"
            self.devices = []
        for dev in self.devices:
            try:
                self.nvml.nvmlDeviceGetTotalEnergyConsumption(dev.handle)
            except Exception as exc:
                dev.has_counter = False
                dev.counter_error = str(exc) or type(exc).__name__
        return self

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None

    @property
    def available(self) -> bool:
        return self.nvml is not None and bool(self.devices)

    # --- device resolution -----------------------------------------------------------------------------------
    def _all_handles(self) -> list[tuple[int, Any, str]]:
        n = int(self.nvml.nvmlDeviceGetCount())
        out = []
        for i in range(n):
            h = self.nvml.nvmlDeviceGetHandleByIndex(i)
            out.append((i, h, _text(self.nvml.nvmlDeviceGetUUID(h))))
        return out

    def _make(self, index: int, handle: Any, uuid: str) -> GpuDevice:
        try:
            name = _text(self.nvml.nvmlDeviceGetName(handle))
        except Exception:
            name = "unknown"
        return GpuDevice(key=f"gpu{index}", nvml_index=index, uuid=uuid, name=name, handle=handle)

    def _resolve(self) -> list[GpuDevice]:
        handles = self._all_handles()
        tokens = parse_visible_devices(self._spec)
        if tokens is None:
            return [self._make(i, h, u) for i, h, u in handles]
        chosen: dict[int, GpuDevice] = {}
        for tok in tokens:
            dev = None
            if tok.isdigit():
                idx = int(tok)
                if idx >= len(handles):
                    self.notes.append(f"CUDA_VISIBLE_DEVICES token {tok!r} is beyond the {len(handles)} devices; "
                                      "later tokens ignored (CUDA semantics)")
                    break
                i, h, u = handles[idx]
                dev = chosen.get(i) or self._make(i, h, u)
            elif tok.startswith("MIG-"):
                dev = self._resolve_mig(tok, handles, chosen)
            else:
                matches = [(i, h, u) for i, h, u in handles if u.startswith(tok)]
                if len(matches) != 1:
                    self.notes.append(f"CUDA_VISIBLE_DEVICES token {tok!r} matches {len(matches)} devices; "
                                      "later tokens ignored (CUDA semantics)")
                    break
                i, h, u = matches[0]
                dev = chosen.get(i) or self._make(i, h, u)
            if dev is None:
                break
            dev.requested.append(tok)
            chosen[dev.nvml_index] = dev
        if len(chosen) > 1 and any(t.isdigit() for t in tokens) and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
            self.notes.append("numeric CUDA_VISIBLE_DEVICES mapped to NVML (PCI bus) order; set "
                              "CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA uses the same order")
        return list(chosen.values())

    def _resolve_mig(self, tok: str, handles, chosen) -> GpuDevice | None:
        try:
            mig_handle = self.nvml.nvmlDeviceGetHandleByUUID(tok)
            parent = self.nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig_handle)
            parent_uuid = _text(self.nvml.nvmlDeviceGetUUID(parent))
        except Exception as exc:
            self.notes.append(f"MIG device {tok!r} could not be resolved to its GPU ({exc}); later tokens ignored")
            return None
        for i, h, u in handles:
            if u == parent_uuid:
                dev = chosen.get(i) or self._make(i, h, u)
                dev.mig = True
                dev.mig_uuids.append(tok)
                return dev
        self.notes.append(f"MIG device {tok!r}: parent GPU {parent_uuid} not found")
        return None

    # --- readings --------------------------------------------------------------------------------------------
    def read_energy_j(self) -> dict[str, float | Exception]:
        """Cumulative energy counter per device in joules (an Exception where the read failed)."""
        out: dict[str, float | Exception] = {}
        for dev in self.devices:
            if not dev.has_counter:
                continue
            try:
                out[dev.key] = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(dev.handle)) / 1000.0
            except Exception as exc:
                out[dev.key] = exc
        return out

    def sample(self, dev: GpuDevice) -> dict[str, float | None]:
        """One timeline sample; raises if the power read fails (the sampler records it), other fields best effort."""
        nv = self.nvml
        power_w = float(nv.nvmlDeviceGetPowerUsage(dev.handle)) / 1000.0
        row: dict[str, float | None] = {"power_w": power_w, "sm_mhz": None, "util_pct": None,
                                        "mem_mib": None, "temp_c": None}
        try:
            row["sm_mhz"] = float(nv.nvmlDeviceGetClockInfo(dev.handle, getattr(nv, "NVML_CLOCK_SM", 1)))
        except Exception:
            pass
        try:
            row["util_pct"] = float(nv.nvmlDeviceGetUtilizationRates(dev.handle).gpu)
        except Exception:
            pass
        try:
            row["mem_mib"] = float(nv.nvmlDeviceGetMemoryInfo(dev.handle).used) / 2**20
        except Exception:
            pass
        try:
            row["temp_c"] = float(nv.nvmlDeviceGetTemperature(dev.handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0)))
        except Exception:
            pass
        return row

    def running_pids(self, dev: GpuDevice) -> set[int]:
        """Pids with a CUDA context (compute or graphics) on the device; raises when NVML cannot list them."""
        nv = self.nvml
        pids = {int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(dev.handle) or []}
        graphics = getattr(nv, "nvmlDeviceGetGraphicsRunningProcesses", None)
        if graphics is not None:
            try:
                pids |= {int(p.pid) for p in graphics(dev.handle) or []}
            except Exception:
                pass   # compute processes are what a stage shares a device with; graphics is best effort
        return pids

    def describe(self) -> dict[str, Any]:
        return {"visible_devices": self._spec, "error": self.error, "notes": list(self.notes),
                "devices": [d.describe() for d in self.devices]}


def cuda_synchronize() -> None:
    """Wait for queued GPU work before reading counters -- only if torch is already imported and CUDA initialised."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception:
        pass
