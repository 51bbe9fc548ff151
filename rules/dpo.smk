# Preference distillation, teacher side: sample candidates (from the SFT'd student, the teacher or both), then a
# judge ranks them into chosen/rejected pairs. Two metered stages, so sampling and judging energy show separately.


rule sample_preferences:
    input:
        unpack(sample_inputs),
    output:
        out_dir=directory(f"{R}/teacher/preferences/{{artifact}}/candidates"),
        energy_json=stage_energy_json("sample_preferences"),
    log:
        stage_log("sample_preferences"),
    benchmark:
        stage_benchmark("sample_preferences")
    conda:
        CONDA_ENV
    threads: threads_for("sample_preferences")
    resources:
        **resources_for("sample_preferences"),
    params:
        models=lambda w: {
            label: model_dir_for(m)
            for label, m in preference_artifact(w).sources.items()
        },
        dpo=lambda w: preference_artifact(w).params,
        seed=CFG["seed"],
        pipeline="dpo",
        artifact=lambda w: w.artifact,
    script:
        "../scripts/stage.py"


rule judge_preferences:
    input:
        **METER_INPUTS,
        # the judge reads candidates with its own tokenizer; the run's is the fallback of a judge dir without one
        **run_tokenizer_input("teacher"),
        candidates=f"{R}/teacher/preferences/{{artifact}}/candidates",
        judge_inputs=lambda w: (
            [model_dir_for("teacher")]
            if preference_artifact(w).judge_model == "teacher"
            else []
        ),
    output:
        out_dir=directory(f"{R}/teacher/preferences/{{artifact}}/pairs"),
        energy_json=stage_energy_json("judge_preferences"),
    log:
        stage_log("judge_preferences"),
    benchmark:
        stage_benchmark("judge_preferences")
    conda:
        CONDA_ENV
    threads: threads_for("judge_preferences")
    resources:
        **resources_for("judge_preferences"),
    params:
        judge_model=lambda w: judge_model_path(preference_artifact(w)),
        dpo=lambda w: preference_artifact(w).params,
        seed=CFG["seed"],
        pipeline="dpo",
        artifact=lambda w: w.artifact,
    script:
        "../scripts/stage.py"


rule precompute_reference:
    """Optional (dpo.precompute_ref_logprobs): the reference model's log-probs of every pair, metered on its own
    (student side: it is this experiment's cost), so training needs no second model in memory.
    """
    input:
        **METER_INPUTS,
        pairs=lambda w: artifact_dir(experiment(w).artifact),
        tokenizer=lambda w: tokenizer_dir_for(f"init.{experiment(w).student}"),
        init_model=lambda w: model_dir_for(experiment(w).init_from),
    output:
        out_dir=directory(f"{R}/models/students/{{exp}}/reference_pairs"),
        energy_json=stage_energy_json("precompute_reference"),
    log:
        stage_log("precompute_reference"),
    benchmark:
        stage_benchmark("precompute_reference")
    conda:
        CONDA_ENV
    threads: threads_for("precompute_reference")
    resources:
        **resources_for("precompute_reference"),
    params:
        dpo=lambda w: experiment(w).sections["dpo"],
        training=lambda w: experiment(w).training,
        seed=lambda w: experiment(w).seed,
        pipeline="dpo",
        experiment=lambda w: w.exp,
    script:
        "../scripts/stage.py"
