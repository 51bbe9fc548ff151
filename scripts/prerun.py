"""Check the hardware against config `hardware:`, burn the GPUs in, record the facts (results/env/prerun.json)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.hardware import prerun  # noqa: E402
from distill_bench.stages import log_to_rule_log  # noqa: E402

log = log_to_rule_log(snakemake)  # noqa: F821
record = prerun(out_json=snakemake.output[0], hardware=snakemake.params.hardware,  # noqa: F821
                energy=snakemake.params.energy)  # noqa: F821
log.info("prerun %s: %s", record["status"], [g["name"] for g in record["gpus"]] or "no GPU")
