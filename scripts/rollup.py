"""Roll every stage JSON and eval result up into the summary files, all paths from the rule's inputs and outputs."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 -- the workflow's own package (conda envs)

from distill_bench.report.rollup import rollup_run  # noqa: E402
from distill_bench.stages import log_to_rule_log  # noqa: E402

log = log_to_rule_log(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
files = {"plan": inp.plan, "config": inp.config, "stages": list(inp.stages), "evals": list(inp.evals),
         "outputs": {key: out[key] for key in out.keys()}}
table = rollup_run(print_table=True, files=files)
log.info("rolled up %d stage JSONs and %d eval results into %d experiments", len(files["stages"]),
         len(files["evals"]), len(table))
