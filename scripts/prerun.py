"""Check the hardware against config `hardware:`, burn the GPUs in, record the facts (results/env/prerun.json)."""
import logging

from distill_bench.hardware import prerun

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, force=True)  # noqa: F821
record = prerun(out_json=snakemake.output[0], hardware=snakemake.params.hardware,  # noqa: F821
                energy=snakemake.params.energy)  # noqa: F821
logging.info("prerun %s: %s", record["status"], [g["name"] for g in record["gpus"]] or "no GPU")
