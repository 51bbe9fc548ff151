# KD, teacher side: one top-k logit cache per (teacher, corpus, tokenizer, k, dtype), shared by every KD student
# of that corpus (the teacher is the configured teacher, or an earlier student for self-distillation). Temperature and alpha are applied at training time, so a tau/alpha sweep reuses one cache.


rule cache_logits:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(logits_artifact(w).teacher),
        tokenizer=f"{R}/tokenizer",
        dataset=lambda w: f"{R}/data/{logits_artifact(w).dataset}",
    output:
        out_dir=directory(f"{R}/teacher/logits/{{artifact}}"),
        energy_json=stage_energy_json("cache_logits"),
    log:
        stage_log("cache_logits"),
    benchmark:
        stage_benchmark("cache_logits")
    conda:
        CONDA_ENV
    threads: threads_for("cache_logits")
    resources:
        **resources_for("cache_logits"),
    params:
        kd=lambda w: logits_artifact(w).params,
        training=lambda w: {"max_length": logits_artifact(w).params["max_length"]},
        seed=CFG["seed"],
        artifact=lambda w: w.artifact,
        energy=ENERGY,
    script:
        "../scripts/stage.py"
