# KD, teacher side: one top-k logit cache per (teacher, corpus, tokenizer, k, dtype), shared by every KD student
# of that corpus (the teacher is the configured teacher, or an earlier student for self-distillation). Alpha is
# applied at training time; each temperature other than 1 (and kd.cache_temperatures) gets its own exact tail
# artifact, so adding a tau to a sweep runs one tail pass and leaves the cache and the other students alone.


rule cache_logits:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(logits_artifact(w).teacher),
        tokenizer=lambda w: tokenizer_dir_for(logits_artifact(w).teacher),
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
    script:
        "../scripts/stage.py"


rule cache_tail:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(logits_artifact(w).teacher),
        tokenizer=lambda w: tokenizer_dir_for(logits_artifact(w).teacher),
        dataset=lambda w: f"{R}/data/{logits_artifact(w).dataset}",
        kd_cache=lambda w: artifact_dir(logits_artifact(w).base),
    output:
        out_dir=directory(f"{R}/teacher/logit_tail/{{artifact}}"),
        energy_json=stage_energy_json("cache_tail"),
    log:
        stage_log("cache_tail"),
    benchmark:
        stage_benchmark("cache_tail")
    conda:
        CONDA_ENV
    threads: threads_for("cache_tail")
    resources:
        **resources_for("cache_tail"),
    params:
        kd=lambda w: {
            k: logits_artifact(w).params[k] for k in ("temperature", "batch_size")
        },
        training=lambda w: {"max_length": logits_artifact(w).params["max_length"]},
        seed=CFG["seed"],
        pipeline="kd",
        artifact=lambda w: w.artifact,
    script:
        "../scripts/stage.py"
