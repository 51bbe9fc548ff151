# Preference distillation, teacher side: sample candidates (from the SFT'd student, the teacher or both), then a
# judge ranks them into chosen/rejected pairs. Two metered stages, so sampling and judging energy show separately.


def preference_artifact(wildcards):
    return PLAN.artifacts[wildcards.artifact]


def sample_inputs(wildcards):
    """Sources that all use the run's tokenizer share it; otherwise each source reads its own from its model dir."""
    art = preference_artifact(wildcards)
    inputs = {**METER_INPUTS, "model_dirs": [model_dir_for(m) for m in art.sources.values()]}
    if all(PLAN.tokenizer_of(m) is None for m in art.sources.values()):
        inputs["tokenizer"] = f"{R}/tokenizer"
    inputs["dataset"] = f"{R}/data/{art.dataset}"
    return inputs


rule sample_preferences:
    input:
        unpack(sample_inputs),
    output:
        out_dir=directory(f"{R}/teacher/preferences/{{artifact}}/candidates"),
        energy_json=energy_json("teacher.sample.{artifact}"),
    params:
        models=lambda w: {label: model_dir_for(m) for label, m in preference_artifact(w).sources.items()},
        dpo=lambda w: preference_artifact(w).params,
        seed=CFG["seed"],
        stage_id=lambda w: f"teacher.sample.{w.artifact}",
        role="teacher",
        pipeline="dpo",
        artifact=lambda w: w.artifact,
    log:
        f"{R}/logs/sample_preferences/{{artifact}}.log",
    benchmark:
        f"{R}/benchmarks/sample_preferences/{{artifact}}.tsv"
    threads: threads_for("sample_preferences")
    resources:
        **resources_for("sample_preferences"),
    script:
        "../scripts/stage.py"


def judge_model_path(artifact):
    judge = artifact.judge_model
    if judge is None:
        return None
    return model_dir_for(judge) if judge == "teacher" or judge in PLAN.experiments else judge


rule judge_preferences:
    input:
        **METER_INPUTS,
        candidates=f"{R}/teacher/preferences/{{artifact}}/candidates",
        # the judge reads candidates with its own tokenizer; the run's is the fallback of a judge dir without one
        **run_tokenizer_input("teacher"),
        judge_inputs=lambda w: [model_dir_for("teacher")] if preference_artifact(w).judge_model == "teacher" else [],
    output:
        out_dir=directory(f"{R}/teacher/preferences/{{artifact}}/pairs"),
        energy_json=energy_json("teacher.judge.{artifact}"),
    params:
        judge_model=lambda w: judge_model_path(preference_artifact(w)),
        dpo=lambda w: preference_artifact(w).params,
        seed=CFG["seed"],
        stage_id=lambda w: f"teacher.judge.{w.artifact}",
        role="teacher",
        pipeline="dpo",
        artifact=lambda w: w.artifact,
    log:
        f"{R}/logs/judge_preferences/{{artifact}}.log",
    benchmark:
        f"{R}/benchmarks/judge_preferences/{{artifact}}.tsv"
    threads: threads_for("judge_preferences")
    resources:
        **resources_for("judge_preferences"),
    script:
        "../scripts/stage.py"


rule precompute_reference:
    """Optional (dpo.precompute_ref_logprobs): the reference model's log-probs of every pair, metered on its own
    (student side: it is this experiment's cost), so training needs no second model in memory."""
    input:
        **METER_INPUTS,
        pairs=lambda w: artifact_dir(experiment(w).artifact),
        tokenizer=lambda w: tokenizer_dir_for(f"init.{experiment(w).student}"),
        init_model=lambda w: model_dir_for(experiment(w).init_from),
    output:
        out_dir=directory(f"{R}/models/students/{{exp}}/reference_pairs"),
        energy_json=energy_json("student.reference.{exp}"),
    params:
        dpo=lambda w: experiment(w).sections["dpo"],
        training=lambda w: experiment(w).training,
        seed=lambda w: experiment(w).seed,
        stage_id=lambda w: f"student.reference.{w.exp}",
        role="student",
        pipeline="dpo",
        experiment=lambda w: w.exp,
    log:
        f"{R}/logs/precompute_reference/{{exp}}.log",
    benchmark:
        f"{R}/benchmarks/precompute_reference/{{exp}}.tsv"
    threads: threads_for("precompute_reference")
    resources:
        **resources_for("precompute_reference"),
    script:
        "../scripts/stage.py"
