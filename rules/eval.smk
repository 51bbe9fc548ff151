# Evaluation: one metered stage per (model, eval): the teacher, each untrained student and each trained student, on
# each verifiable dataset's held-out split (native or lm-eval local task) and on each configured lm-eval task.


def eval_inputs(wildcards):
    inputs = {**METER_INPUTS, "model": model_dir_for(wildcards.model_id), "tokenizer": f"{R}/tokenizer"}
    if wildcards.eval_name in CFG["datasets"]:
        inputs["dataset"] = f"{R}/data/{wildcards.eval_name}"
    return inputs


def eval_settings(wildcards):
    if wildcards.model_id in PLAN.experiments:
        return PLAN.experiments[wildcards.model_id].sections["eval"]
    return CFG["eval"]


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        out_json=f"{R}/eval/{{model_id}}/{{eval_name}}.json",
        energy_json=energy_json("eval.{model_id}.{eval_name}"),
    params:
        eval=eval_settings,
        task=lambda w: None if w.eval_name in CFG["datasets"] else w.eval_name,
        model_id=lambda w: w.model_id,
        seed=CFG["seed"],
        stage_id=lambda w: f"eval.{w.model_id}.{w.eval_name}",
        role="eval",
        experiment=lambda w: w.model_id if w.model_id in PLAN.experiments else None,
        pipeline=lambda w: PLAN.experiments[w.model_id].pipeline if w.model_id in PLAN.experiments else "shared",
    log:
        f"{R}/logs/evaluate/{{model_id}}.{{eval_name}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{model_id}}.{{eval_name}}.tsv"
    threads: threads_for("evaluate")
    resources:
        **resources_for("evaluate"),
    script:
        "../scripts/stage.py"
