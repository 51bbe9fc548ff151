"""Energy accounting for distill-bench stages: NVML counters, RAPL, labelled estimates, CodeCarbon, idle baseline.

No torch import here: torch is only touched (lazily) for ``cuda.synchronize`` when the caller already uses it.
"""
from distill_bench.atomic import atomic_write_json, atomic_write_text
from .environment import write_environment_snapshot
from .idle import measure_idle
from .meter import StageInterrupted, StageMeter, run_stage
from .settings import EnergySettings
from .validate import load_stage_json, validate_stage_dict

__all__ = ["EnergySettings", "StageInterrupted", "StageMeter", "run_stage", "load_stage_json", "validate_stage_dict",
           "measure_idle", "write_environment_snapshot", "atomic_write_json", "atomic_write_text"]
