# Input functions and shared settings. Everything derives from PLAN (distill_bench.config.plan), which the
# roll-up reads too, so the DAG and the energy accounting cannot disagree.

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
# through rule params: they change how a stage is measured, not what it makes, so changing them reruns no stage
# (only the prerun check and the idle baseline, which take them as params). Re-measure with --forcerun.
ENERGY = {
    **{k: v for k, v in CFG["energy"].items() if k not in ("idle_seconds", "accept_shared_devices")},
    "idle_json": f"{R}/energy/idle.json",
    "environment_json": f"{R}/env/environment.json",
}
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
            out["runtime"] = (lambda base: (lambda wildcards, attempt: base * attempt))(value)
        elif key == "gpu" and value == 0:
            continue
        else:
            out[key] = value
    if LOCAL_GPUS and rule_name in GPU_CAPABLE_RULES:
        out.pop("gres", None)
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
                per_exp[exp_id] = local_gpu_request(CFG, rule_name, LOCAL_GPUS, exp.training.get("gpus"))
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
        return init_dir(model_id[len("init."):])
    return f"{R}/models/students/{model_id}/final"


def artifact_dir(artifact_id):
    """Where a shared teacher artifact lives: a logit cache, a synthetic set, or a preference-pair set."""
    art = PLAN.artifacts[artifact_id]
    if art.kind == "preferences":
        return f"{R}/teacher/preferences/{artifact_id}/pairs"
    return f"{R}/teacher/{art.kind}/{artifact_id}"


def shard_dirs(artifact_id):
    art = PLAN.artifacts[artifact_id]
    n = art.params["shards"]
    return [f"{R}/teacher/synthetic_shards/{art.shard_key}/shard{i}of{n}" for i in range(n)]


def synthetic_artifact_by_shard_key(shard_key):
    for art in PLAN.artifacts.values():
        if art.shard_key == shard_key:
            return art
    raise ValueError(f"unknown synthetic shard key {shard_key!r}")


def generation_settings(artifact):
    """What a generation shard is made from: the synthetic settings without the filters (applied at merge time) and
    the shard count (a wildcard), so a filter change reruns only the merge."""
    return {k: v for k, v in artifact.params.items() if k not in ("filters", "shards")}
