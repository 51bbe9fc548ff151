"""CodeCarbon cross-check: one OfflineEmissionsTracker per stage, output in the stage's own folder.

CodeCarbon swallows its own exceptions and logs them; we capture its log records so a failure is recorded under
``codecarbon.error`` instead of silently yielding nothing. Figures are read from the tracker object, never from a CSV.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

KWH = 3.6e6


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            msg = f"{msg}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        self.messages.append(msg)


class CodeCarbonAdapter:
    def __init__(self, *, output_dir: Path, country_iso_code: str, project_name: str,
                 measure_power_secs: float = 15.0):
        self.output_dir = output_dir
        self.country_iso_code = country_iso_code
        self.project_name = project_name
        self.measure_power_secs = measure_power_secs
        self.tracker: Any = None
        self.error: str | None = None
        self.startup_s: float | None = None
        self._capture = _Capture()
        self._logger = logging.getLogger("codecarbon")

    def start(self) -> None:
        t = time.perf_counter()
        self._logger.addHandler(self._capture)
        if self._logger.level == logging.NOTSET or self._logger.level < logging.ERROR:
            self._logger.setLevel(logging.ERROR)   # its "offline tracker init" INFO is logged before log_level applies
        try:
            from codecarbon import OfflineEmissionsTracker

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.tracker = OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code, output_dir=str(self.output_dir), log_level="error",
                project_name=self.project_name, measure_power_secs=self.measure_power_secs,
                tracking_mode="machine", allow_multiple_runs=True)
            self.tracker.start()
        except Exception as exc:
            self.error = f"start: {type(exc).__name__}: {exc}"
            self.tracker = None
        self.startup_s = time.perf_counter() - t

    def stop(self) -> dict[str, Any]:
        """Stop the tracker and return its figures (kWh / kg as CodeCarbon reports them) plus any error."""
        out: dict[str, Any] = {"enabled": True, "output_dir": self.output_dir.name, "startup_s": self.startup_s,
                               "tracking_mode": "machine", "country_iso_code": self.country_iso_code}
        data = None
        if self.tracker is not None:
            try:
                self.tracker.stop()
                data = getattr(self.tracker, "final_emissions_data", None)
            except Exception as exc:
                self.error = self.error or f"stop: {type(exc).__name__}: {exc}"
        self._logger.removeHandler(self._capture)
        if data is not None:
            for ours, theirs in (("emissions_kg", "emissions"), ("energy_kwh", "energy_consumed"),
                                 ("cpu_energy_kwh", "cpu_energy"), ("gpu_energy_kwh", "gpu_energy"),
                                 ("ram_energy_kwh", "ram_energy"), ("duration_s", "duration"),
                                 ("cpu_power_w", "cpu_power"), ("gpu_power_w", "gpu_power"),
                                 ("ram_power_w", "ram_power")):
                value = getattr(data, theirs, None)
                out[ours] = float(value) if isinstance(value, (int, float)) else None
            out["cpu_model"] = getattr(data, "cpu_model", None)
            out["gpu_model"] = getattr(data, "gpu_model", None)
            out["codecarbon_version"] = getattr(data, "codecarbon_version", None)
        elif self.error is None:
            errs = [m for m in self._capture.messages if "Exception" in m or "Error" in m]
            self.error = "no emissions data from CodeCarbon" + (f" ({errs[-1]})" if errs else "")
        out["error"] = self.error
        return out
