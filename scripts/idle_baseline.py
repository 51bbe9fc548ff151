"""Idle power per device, once per run; every stage JSON subtracts it to report net energy."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.energy import EnergySettings, measure_idle  # noqa: E402
from distill_bench.energy.lease import job_gpus, lease_for_job  # noqa: E402
from distill_bench.stages import log_to_rule_log  # noqa: E402

log = log_to_rule_log(snakemake)  # noqa: F821
# every visible GPU, leased before anything touches CUDA: no stage may run on a device while its idle power is read
lease_for_job(job_gpus(snakemake.resources), stage_id="idle_baseline", rule=snakemake.rule,  # noqa: F821
              lock_dir=snakemake.params.energy.get("lock_dir"))  # noqa: F821
settings = EnergySettings.from_dict(snakemake.params.energy)  # noqa: F821
measure_idle(snakemake.output[0], seconds=snakemake.params.seconds, settings=settings)  # noqa: F821
log.info("idle baseline over %s s written to %s", snakemake.params.seconds, snakemake.output[0])  # noqa: F821
