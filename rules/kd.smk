# KD, teacher side: one top-k logit cache per (teacher, corpus, tokenizer, k, dtype), shared by every KD student
# of that corpus (the teacher is the configured teacher, or an earlier student for self-distillation). Temperature and alpha are applied at training time, so a tau/alpha sweep reuses one cache.


def logits_artifact(wildcards):
    return PLAN.artifacts[wildcards.artifact]


rule cache_logits:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(logits_artifact(w).teacher),
        tokenizer=lambda w: tokenizer_dir_for(logits_artifact(w).teacher),
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
        energy=ENERGY,
    log:
        f"{R}/logs/cache_logits/{{artifact}}.log",
    benchmark:
        f"{R}/benchmarks/cache_logits/{{artifact}}.tsv"
    threads: threads_for("cache_logits")
    resources:
        **resources_for("cache_logits"),
    script:
        "../scripts/stage.py"
