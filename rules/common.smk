# Input functions and shared settings. Everything derives from PLAN (distill_bench.config.plan), which the
# roll-up reads too, so the DAG and the energy accounting cannot disagree.

from distill_bench.config.plan import STAGE_IDS
from distill_bench.energy.settings import IGNORED_CONFIG_KEYS


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    student="[A-Za-z0-9_]+",
    exp="[A-Za-z0-9_.-]+",
    artifact="[A-Za-z0-9_.-]+",
    model_id="[A-Za-z0-9_.-]+",
    eval_name="[A-Za-z0-9_]+",
    shard_key="[A-Za-z0-9_.-]+",
    shard="[0-9]+",
    nshards="[0-9]+",


# energy settings handed to every stage's meter. They reach the stages through the config the adapter sees, not
# through the params of a rule; they change how a stage is measured, not what it makes, so changing them reruns no stage
# (only the prerun check and the idle baseline, which take them as params). Re-measure with --forcerun.
# (the idle baseline and environment snapshot reach each stage's meter through its METER_INPUTS, not here)
ENERGY = {k: v for k, v in CFG["energy"].items() if k not in IGNORED_CONFIG_KEYS}
config[METER_SETTINGS_KEY] = ENERGY
# idle baseline and environment snapshot: needed before any stage, but their mtime must not rerun the DAG
METER_INPUTS = {
    "idle": ancient(f"{R}/energy/idle.json"),
    "environment": ancient(f"{R}/env/environment.json"),
}


def energy_json(stage_id):
    return f"{R}/energy/{stage_id}.json"


def resources_for(rule_name):
    """Snakemake resources of a rule (cpus -> cpus_per_task); runtime grows with each retry."""
    res = rule_resources(CFG, rule_name)
    out = {}
    for key, value in res.items():
        if key == "cpus":
            out["cpus_per_task"] = value
        elif key == "runtime":
            out["runtime"] = (lambda base: (lambda wildcards, attempt: base * attempt))(
                value
            )
        elif key == "gpu" and value == 0:
            continue
        else:
            out[key] = value
    if LOCAL_GPUS and rule_name in GPU_CAPABLE_RULES:
        out.pop("gres", None)
        out.pop("gpu", None)
        if EXCLUSIVE_GPUS:
            out["gpu"] = local_gpu_resource(rule_name)
    return out


def local_gpu_resource(rule_name):
    """GPUs a job of ``rule_name`` leases locally; a request beyond the visible GPUs stops planning here."""
    try:
        if rule_name != "train_student":
            return local_gpu_request(CFG, rule_name, LOCAL_GPUS)
        per_exp = {}
        for exp_id, exp in PLAN.experiments.items():
            try:
                per_exp[exp_id] = local_gpu_request(
                    CFG, rule_name, LOCAL_GPUS, exp.training.get("gpus")
                )
            except HardwareError as err:
                raise HardwareError(f"{err} (experiment {exp_id!r})") from None
    except HardwareError as err:
        raise WorkflowError(str(err)) from None
    return lambda wildcards: per_exp[wildcards.exp]


def threads_for(rule_name):
    return int(rule_resources(CFG, rule_name).get("cpus", 1))


def experiment(wildcards):
    return PLAN.experiments[wildcards.exp]


def init_dir(student):
    return f"{R}/models/init/{student}"


def model_dir_for(model_id):
    """Where an evaluated model lives: the teacher, an untrained student init, or a trained experiment."""
    if model_id == "teacher":
        return f"{R}/models/teacher"
    if model_id.startswith("init."):
        return init_dir(model_id[len("init.") :])
    return f"{R}/models/students/{model_id}/final"


def tokenizer_dir_for(model_id):
    """The tokenizer a stage uses with a model: the run's (results/tokenizer) for models built from an arch, else
    the model's own, read from its directory (a pretrained model's model_ref.json names it; trained ones carry it).
    A student in training uses its init's."""
    if PLAN.tokenizer_of(model_id) is None:
        return f"{R}/tokenizer"
    return model_dir_for(model_id)


def run_tokenizer_input(model_id):
    """{"tokenizer": results/tokenizer} for a model that uses the run's tokenizer, else nothing (its own)."""
    return (
        {"tokenizer": f"{R}/tokenizer"} if PLAN.tokenizer_of(model_id) is None else {}
    )


def init_student_inputs(wildcards):
    """A student built from an arch reads the run's tokenizer; a pretrained one its own (named in its pointer)."""
    return {**METER_INPUTS, **run_tokenizer_input(f"init.{wildcards.student}")}


def artifact_dir(artifact_id):
    """Where a shared teacher artifact lives: a logit cache, a synthetic set, or a preference-pair set."""
    art = PLAN.artifacts[artifact_id]
    if art.kind == "preferences":
        return f"{R}/teacher/preferences/{artifact_id}/pairs"
    return f"{R}/teacher/{art.kind}/{artifact_id}"


def shard_dirs(artifact_id):
    art = PLAN.artifacts[artifact_id]
    n = art.params["shards"]
    return [
        f"{R}/teacher/synthetic_shards/{art.shard_key}/shard{i}of{n}" for i in range(n)
    ]


def synthetic_artifact_by_shard_key(shard_key):
    for art in PLAN.artifacts.values():
        if art.shard_key == shard_key:
            return art
    raise ValueError(f"unknown synthetic shard key {shard_key!r}")


def generation_settings(artifact):
    """What a generation shard is made from: the synthetic settings without the filters (applied at merge time) and
    the shard count (a wildcard), so a filter change reruns only the merge."""
    return {k: v for k, v in artifact.params.items() if k not in ("filters", "shards")}


# A stage's identity comes from one place, distill_bench.config.plan.STAGE_IDS (rule -> stage id over the rule's
# wildcards): the plan lists stages by it, the roll-up charges by it, and each stage rule's energy JSON, log and
# benchmark are named after it here. The stage adapter reads the id back from the energy JSON's name and the role
# from the stage registry, so a rule spells neither.
def stage_energy_json(rule_name):
    return f"{R}/energy/{STAGE_IDS[rule_name]}.json"


def stage_log(rule_name):
    return f"{R}/logs/{STAGE_IDS[rule_name]}.log"


def stage_benchmark(rule_name):
    return f"{R}/benchmarks/{STAGE_IDS[rule_name]}.tsv"


# the software environment of every rule, for --software-deployment-method conda (pinned like requirements.lock)
CONDA_ENV = "../envs/distill-bench.yaml"


# from dpo.smk
def preference_artifact(wildcards):
    return PLAN.artifacts[wildcards.artifact]


# from dpo.smk
def sample_inputs(wildcards):
    """Sources that all use the run's tokenizer share it; otherwise each source reads its own from its model dir."""
    art = preference_artifact(wildcards)
    inputs = {
        **METER_INPUTS,
        "model_dirs": [model_dir_for(m) for m in art.sources.values()],
    }
    if all(PLAN.tokenizer_of(m) is None for m in art.sources.values()):
        inputs["tokenizer"] = f"{R}/tokenizer"
    inputs["dataset"] = f"{R}/data/{art.dataset}"
    return inputs


# from dpo.smk
def judge_model_path(artifact):
    judge = artifact.judge_model
    if judge is None:
        return None
    return (
        model_dir_for(judge)
        if judge == "teacher" or judge in PLAN.experiments
        else judge
    )


# from eval.smk
def eval_inputs(wildcards):
    inputs = {
        **METER_INPUTS,
        "model": model_dir_for(wildcards.model_id),
        "tokenizer": tokenizer_dir_for(wildcards.model_id),
    }
    if wildcards.eval_name in CFG["datasets"]:
        inputs["dataset"] = f"{R}/data/{wildcards.eval_name}"
    return inputs


# from eval.smk
def eval_settings(wildcards):
    if wildcards.model_id in PLAN.experiments:
        return PLAN.experiments[wildcards.model_id].sections["eval"]
    return CFG["eval"]


# from kd.smk
def logits_artifact(wildcards):
    return PLAN.artifacts[wildcards.artifact]


# from train.smk
def train_inputs(wildcards):
    """The student starts from its init, or from an earlier experiment's model (DPO, self-distillation,
    continued training); it reads ground truth, a synthetic set or preference pairs, plus a logit cache for KD.
    """
    exp = experiment(wildcards)
    init = model_dir_for(exp.init_from) if exp.init_from else init_dir(exp.student)
    inputs = {
        **METER_INPUTS,
        "tokenizer": tokenizer_dir_for(f"init.{exp.student}"),
        "init_model": init,
    }
    if exp.trainer == "dpo" and exp.sections["dpo"]["precompute_ref_logprobs"]:
        inputs["dataset"] = f"{R}/models/students/{exp.id}/reference_pairs"
    elif exp.trainer in ("sft", "dpo"):
        inputs["dataset"] = artifact_dir(exp.artifact)
    else:
        inputs["dataset"] = f"{R}/data/{exp.dataset}"
    if exp.trainer == "kd":
        inputs["kd_cache"] = artifact_dir(exp.artifact)
        if exp.tail_artifact:
            inputs["kd_tail"] = artifact_dir(exp.tail_artifact)
    return inputs
