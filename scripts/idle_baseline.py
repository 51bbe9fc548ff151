"""Idle power per device, once per run; every stage JSON subtracts it to report net energy."""
from distill_bench.energy import EnergySettings, measure_idle
from distill_bench.energy.lease import job_gpus, lease_for_job

# every visible GPU, leased before anything touches CUDA: no stage may run on a device while its idle power is read
lease_for_job(job_gpus(snakemake.resources), stage_id="idle_baseline", rule=snakemake.rule,  # noqa: F821
              lock_dir=snakemake.params.energy.get("lock_dir"))  # noqa: F821
settings = EnergySettings.from_dict({k: v for k, v in snakemake.params.energy.items() if k != "idle_json"})  # noqa: F821
measure_idle(snakemake.output[0], seconds=snakemake.params.seconds, settings=settings)  # noqa: F821
