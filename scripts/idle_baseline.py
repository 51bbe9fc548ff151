"""Idle power per device, once per run; every stage JSON subtracts it to report net energy."""
from distill_bench.energy import EnergySettings, measure_idle

settings = EnergySettings.from_dict({k: v for k, v in snakemake.params.energy.items() if k != "idle_json"})  # noqa: F821
measure_idle(snakemake.output[0], seconds=snakemake.params.seconds, settings=settings)  # noqa: F821
