# Student side: every pipeline trains with the same trainer, token budget, optimizer and schedule.
# Checkpoints live beside (not inside) the declared output, so a failed or preempted job resumes from them.


def train_inputs(wildcards):
    """The student starts from its init, or from an earlier experiment's model (DPO, self-distillation,
    continued training); it reads ground truth, a synthetic set or preference pairs, plus a logit cache for KD."""
    exp = experiment(wildcards)
    init = model_dir_for(exp.init_from) if exp.init_from else init_dir(exp.student)
    inputs = {**METER_INPUTS, "tokenizer": tokenizer_dir_for(f"init.{exp.student}"), "init_model": init}
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


rule train_student:
    input:
        unpack(train_inputs),
    output:
        directory(f"{R}/models/students/{{exp}}/final"),
        energy_json=energy_json("student.train.{exp}"),
    params:
        pipeline=lambda w: experiment(w).pipeline,
        out_dir=lambda w: f"{R}/models/students/{w.exp}",
        training=lambda w: experiment(w).training,
        method=lambda w: experiment(w).trainer,
        kd=lambda w: experiment(w).sections["kd"] if experiment(w).trainer == "kd" else None,
        dpo=lambda w: experiment(w).sections["dpo"] if experiment(w).trainer == "dpo" else None,
        seed=lambda w: experiment(w).seed,
        stage_id=lambda w: f"student.train.{w.exp}",
        role="student",
        experiment=lambda w: w.exp,
    log:
        f"{R}/logs/train_student/{{exp}}.log",
    benchmark:
        f"{R}/benchmarks/train_student/{{exp}}.tsv"
    threads: threads_for("train_student")
    resources:
        **resources_for("train_student"),
    script:
        "../scripts/stage.py"
