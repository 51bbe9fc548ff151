"""RAPL reader over /sys/class/powercap (root configurable, so tests use a fake tree).

Counters wrap at ``max_energy_range_uj``; :class:`RaplAccumulator` is polled often enough (every sampler slow tick)
that at most one wrap happens between reads.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = "/sys/class/powercap"
SOURCE = "measured:rapl"


@dataclass
class RaplZone:
    path: Path
    name: str              # "package-0", "dram", ...
    kind: str              # "package" | "dram"
    max_range_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())


def discover(root: str | os.PathLike = DEFAULT_ROOT) -> tuple[list[RaplZone], str | None]:
    """Package zones and their dram subzones whose counters we can actually read; else ([], reason)."""
    root = Path(root)
    if not root.is_dir():
        return [], f"{root} does not exist"
    zones: list[RaplZone] = []
    errors: list[str] = []
    seen: set[str] = set()
    # sysfs lists subzones both at the top level (symlinks) and nested in their package directory
    for zdir in sorted([*root.glob("intel-rapl:*"), *root.glob("intel-rapl:*/intel-rapl:*")]):
        if zdir.name in seen:
            continue
        seen.add(zdir.name)
        try:
            name = (zdir / "name").read_text().strip()
        except OSError as exc:
            errors.append(f"{zdir.name}: {exc}")
            continue
        depth = zdir.name.count(":")
        if depth == 1 and name.startswith("package"):
            kind = "package"
        elif depth == 2 and name == "dram":
            kind = "dram"
        else:
            continue
        try:
            max_range = int((zdir / "max_energy_range_uj").read_text().strip())
            zone = RaplZone(zdir, f"{zdir.name}:{name}", kind, max_range)
            zone.read_uj()
        except (OSError, ValueError) as exc:
            errors.append(f"{zdir.name}/energy_uj unreadable: {exc.__class__.__name__}: {exc}")
            continue
        zones.append(zone)
    if not any(z.kind == "package" for z in zones):
        reason = "; ".join(errors) if errors else f"no readable RAPL package zone under {root}"
        return [], reason
    return zones, None


def wrap_delta(start_uj: int, end_uj: int, max_range_uj: int) -> int:
    """Counter difference allowing for one wrap-around at ``max_range_uj``."""
    d = end_uj - start_uj
    if d < 0:
        d += max_range_uj
    return d


class RaplAccumulator:
    """Sums wrap-corrected deltas per kind (package -> cpu, dram -> ram) between polls; thread-safe."""

    def __init__(self, zones: list[RaplZone]):
        self.zones = zones
        self._lock = threading.Lock()
        self._last = {z.name: z.read_uj() for z in zones}
        self.total_uj = {z.name: 0 for z in zones}
        self.error: str | None = None

    def poll(self) -> None:
        with self._lock:
            for z in self.zones:
                try:
                    now = z.read_uj()
                except (OSError, ValueError) as exc:
                    self.error = f"{z.name}: {exc}"
                    continue
                self.total_uj[z.name] += wrap_delta(self._last[z.name], now, z.max_range_uj)
                self._last[z.name] = now

    def joules(self, kind: str) -> float | None:
        names = [z.name for z in self.zones if z.kind == kind]
        if not names:
            return None
        with self._lock:
            return sum(self.total_uj[n] for n in names) / 1e6
