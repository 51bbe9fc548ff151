# Evaluation: one metered stage per (model, eval): the teacher, each untrained student and each trained student, on
# each verifiable dataset's held-out split (native or lm-eval local task) and on each configured lm-eval task.


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        out_json=f"{R}/eval/{{model_id}}/{{eval_name}}.json",
        energy_json=stage_energy_json("evaluate"),
    log:
        stage_log("evaluate"),
    benchmark:
        stage_benchmark("evaluate")
    conda:
        CONDA_ENV
    threads: threads_for("evaluate")
    resources:
        **resources_for("evaluate"),
    params:
        eval=eval_settings,
        task=lambda w: None if w.eval_name in CFG["datasets"] else w.eval_name,
        model_id=lambda w: w.model_id,
        seed=CFG["seed"],
        experiment=lambda w: w.model_id if w.model_id in PLAN.experiments else None,
        pipeline=lambda w: (
            PLAN.experiments[w.model_id].pipeline
            if w.model_id in PLAN.experiments
            else "shared"
        ),
    script:
        "../scripts/stage.py"
