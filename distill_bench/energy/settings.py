"""Energy settings: the `energy:` section of the workflow config, validated with the offending key named."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from distill_bench.defaults import allowed_values, section_defaults

# the schema's `energy` section: defaults and policies
DEFAULTS = section_defaults("energy")
POLICIES = allowed_values("energy", "policy")
# keys of the workflow config's `energy:` section that configure something other than the meter
IGNORED_CONFIG_KEYS = ("idle_seconds", "accept_shared_devices", "exclusive_gpus")


@dataclass
class EnergySettings:
    """The meter's settings: the config's ``energy`` section (schema defaults) plus the two files the workflow
    points it at (``idle_json``, ``environment_json``; None outside the workflow)."""

    policy: str = DEFAULTS["policy"]
    sample_interval_s: float = DEFAULTS["sample_interval_s"]
    country_iso_code: str = DEFAULTS["country_iso_code"]
    codecarbon: bool = DEFAULTS["codecarbon"]
    cpu_tdp_w: float | None = DEFAULTS["cpu_tdp_w"]
    idle_json: str | None = None
    snapshot_interval_s: float = DEFAULTS["snapshot_interval_s"]
    ledger_interval_s: float = DEFAULTS["ledger_interval_s"]
    environment_json: str | None = None
    lock_dir: str | None = DEFAULTS["lock_dir"]

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"energy.policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        for key in ("sample_interval_s", "snapshot_interval_s", "ledger_interval_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"energy.{key} must be a positive number of seconds; got {value!r}")
            setattr(self, key, float(value))
        if self.cpu_tdp_w is not None:
            if isinstance(self.cpu_tdp_w, bool) or not isinstance(self.cpu_tdp_w, (int, float)) or not self.cpu_tdp_w > 0:
                raise ValueError(f"energy.cpu_tdp_w must be a positive number of watts or null; got {self.cpu_tdp_w!r}")
            self.cpu_tdp_w = float(self.cpu_tdp_w)
        if not isinstance(self.codecarbon, bool):
            raise ValueError(f"energy.codecarbon must be true or false; got {self.codecarbon!r}")
        if not isinstance(self.country_iso_code, str) or len(self.country_iso_code) != 3:
            raise ValueError(f"energy.country_iso_code must be a 3-letter ISO code; got {self.country_iso_code!r}")
        if self.policy == "codecarbon" and not self.codecarbon:
            raise ValueError("energy.policy 'codecarbon' needs energy.codecarbon: true")
        for key in ("idle_json", "environment_json", "lock_dir"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, str(value))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EnergySettings":
        """Build from a plain dict (the config's `energy:` section); unknown keys are errors, not silently dropped."""
        if d is None:
            return cls()
        if isinstance(d, EnergySettings):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"energy settings must be a mapping; got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names and k not in IGNORED_CONFIG_KEYS]
        if unknown:
            raise ValueError(f"unknown energy setting(s) {', '.join('energy.' + str(k) for k in unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
