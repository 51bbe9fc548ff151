"""Check the hardware against config `hardware:`, burn the GPUs in, record the facts (results/env/prerun.json)."""
import logging

from distill_bench.energy.lease import job_gpus, lease_for_job
from distill_bench.hardware import prerun

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, force=True)  # noqa: F821
# every visible GPU, leased before anything touches CUDA: the burn-in and the checks see each device alone
lease_for_job(job_gpus(snakemake.resources), stage_id="prerun", rule=snakemake.rule,  # noqa: F821
              lock_dir=snakemake.params.energy.get("lock_dir"))  # noqa: F821
record = prerun(out_json=snakemake.output[0], hardware=snakemake.params.hardware,  # noqa: F821
                energy=snakemake.params.energy)  # noqa: F821
logging.info("prerun %s: %s", record["status"], [g["name"] for g in record["gpus"]] or "no GPU")
