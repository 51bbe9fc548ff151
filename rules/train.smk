# Student side: every pipeline trains with the same trainer, token budget, optimizer and schedule.
# Checkpoints live beside (not inside) the declared output, so a failed or preempted job resumes from them.


rule train_student:
    input:
        unpack(train_inputs),
    output:
        directory(f"{R}/models/students/{{exp}}/final"),
        energy_json=stage_energy_json("train_student"),
    log:
        stage_log("train_student"),
    benchmark:
        stage_benchmark("train_student")
    conda:
        CONDA_ENV
    threads: threads_for("train_student")
    resources:
        **resources_for("train_student"),
    params:
        pipeline=lambda w: experiment(w).pipeline,
        out_dir=lambda w: f"{R}/models/students/{w.exp}",
        training=lambda w: experiment(w).training,
        method=lambda w: experiment(w).trainer,
        kd=lambda w: (
            experiment(w).sections["kd"] if experiment(w).trainer == "kd" else None
        ),
        dpo=lambda w: (
            experiment(w).sections["dpo"] if experiment(w).trainer == "dpo" else None
        ),
        seed=lambda w: experiment(w).seed,
        experiment=lambda w: w.exp,
    script:
        "../scripts/stage.py"
