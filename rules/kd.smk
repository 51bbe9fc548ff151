# KD, teacher side: one top-k logit cache per (teacher, corpus, tokenizer, k, dtype), shared by every KD student
# of that corpus (the teacher is the configured teacher, or an earlier student for self-distillation). Alpha is
# applied at training time; each temperature other than 1 (and kd.cache_temperatures) gets its own exact tail
# artifact, so adding a tau to a sweep runs one tail pass and leaves the cache and the other students alone.


def logits_artifact(wildcards):
    return PLAN.artifacts[wildcards.artifact]


rule cache_logits:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(logits_artifact(w).teacher),
        tokenizer=f"{R}/tokenizer",
        dataset=lambda w: f"{R}/data/{logits_artifact(w).dataset}",
    output:
        out_dir=directory(f"{R}/teacher/logits/{{artifact}}"),
        energy_json=energy_json("teacher.logits.{artifact}"),
    params:
        kd=lambda w: logits_artifact(w).params,
        training=lambda w: {"max_length": logits_artifact(w).params["max_length"]},
        seed=CFG["seed"],
        stage_id=lambda w: f"teacher.logits.{w.artifact}",
        role="teacher",
        artifact=lambda w: w.artifact,
    log:
        f"{R}/logs/cache_logits/{{artifact}}.log",
    benchmark:
        f"{R}/benchmarks/cache_logits/{{artifact}}.tsv"
    threads: threads_for("cache_logits")
    resources:
        **resources_for("cache_logits"),
    script:
        "../scripts/stage.py"


rule cache_tail:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(logits_artifact(w).teacher),
        tokenizer=f"{R}/tokenizer",
        dataset=lambda w: f"{R}/data/{logits_artifact(w).dataset}",
        kd_cache=lambda w: artifact_dir(logits_artifact(w).base),
    output:
        out_dir=directory(f"{R}/teacher/logit_tail/{{artifact}}"),
        energy_json=energy_json("teacher.tail.{artifact}"),
    params:
        kd=lambda w: {k: logits_artifact(w).params[k] for k in ("temperature", "batch_size")},
        training=lambda w: {"max_length": logits_artifact(w).params["max_length"]},
        seed=CFG["seed"],
        stage_id=lambda w: f"teacher.tail.{w.artifact}",
        role="teacher",
        pipeline="kd",
        artifact=lambda w: w.artifact,
    log:
        f"{R}/logs/cache_tail/{{artifact}}.log",
    benchmark:
        f"{R}/benchmarks/cache_tail/{{artifact}}.tsv"
    threads: threads_for("cache_tail")
    resources:
        **resources_for("cache_tail"),
    script:
        "../scripts/stage.py"
