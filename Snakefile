# distill-bench: energy, quality and throughput of LLM distillation pipelines, stage by stage.
#
#   snakemake                                     embedded default (workflow_config.yaml), CPU, minutes
#   snakemake -n --configfile configs/olmo2_cluster.yaml --profile profiles/slurm     plan a cluster grid
#
# No torch import here: planning a 27-experiment grid must stay fast.
from snakemake.utils import min_version

min_version("9.0")

import sys

sys.path.insert(0, workflow.basedir)
from distill_bench.config import ConfigError
from distill_bench.config.plan import teacher_training
from distill_bench.config.preflight import preflight
from distill_bench.energy.lease import visible_gpu_count
from distill_bench.hardware import (
    GPU_CAPABLE_RULES,
    HardwareError,
    local_gpu_request,
    rule_resources,
)
from distill_bench.config.preflight import METER_SETTINGS_KEY

# The embedded default comes from profiles/default (`configfile:`), which a --configfile on the command line
# replaces rather than merges into: a cluster config never inherits the embedded datasets and students.
try:
    CFG, PLAN = preflight(
        config, "the config given to snakemake (--configfile / --config)"
    )
except (ConfigError, HardwareError) as _err:
    raise WorkflowError(str(_err)) from None

R = CFG["results_dir"]

# Exclusive GPUs for local runs: a device's energy counter is the whole device's, so two stages on one GPU would each
# bill the other's work. GPU-capable rules declare the resource `gpu` and the global `gpu` is the number of visible
# GPUs (no flag to remember; `--resources gpu=N` still wins). Cluster submission (--jobs, a remote executor) is left
# alone: the scheduler grants GPUs there. Without a visible GPU nothing changes and every rule runs on the CPU.
# energy.exclusive_gpus: false drops both the cap and the leases (stages may then share a GPU; the meters detect it).
LOCAL_GPUS = 0
EXCLUSIVE_GPUS = bool(CFG["energy"]["exclusive_gpus"])
if workflow.is_main_process and workflow.global_resources["_nodes"].value is None:
    LOCAL_GPUS = visible_gpu_count()
    if LOCAL_GPUS and EXCLUSIVE_GPUS and "gpu" not in workflow.global_resources:
        workflow.register_resource("gpu", LOCAL_GPUS)


report: "report/workflow.rst"


# Run-level reconciliation: read every visible device's energy counter (NVML, RAPL) as the run starts; the roll-up,
# the run's last job, reads them again as its end. Snakemake calls onstart only when jobs will run (never on a
# dry-run, never inside a job's own Snakemake process); the run id reaches the jobs through the environment.
onstart:
    from distill_bench.energy.run_counters import start_run

    _run_id, _start = start_run(R)
    print(f"distill-bench: run {_run_id}: device energy counters read -> {_start}")


include: "rules/common.smk"
include: "rules/setup.smk"
include: "rules/prerun.smk"
include: "rules/kd.smk"
include: "rules/synthetic.smk"
include: "rules/dpo.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


rule all:
    """The summary, plus every declared stage JSON and eval result: Snakemake reruns a job whose missing output only
    a finished job reads, so listing them here makes a deleted stage JSON rerun its stage (then the roll-up).
    """
    default_target: True
    input:
        f"{R}/summary/comparison.csv",
        [f"{R}/summary/wandb_runs.txt"] if CFG["report"]["wandb"]["enabled"] else [],
        [energy_json(s) for s in PLAN.all_stage_ids()],
        [f"{R}/eval/{m}/{d}.json" for m, d in PLAN.eval_units],
