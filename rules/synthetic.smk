# Synthetic-data SFT, teacher side: scatter generation over N shards (one job each, one GPU each on a cluster),
# gather and filter. Shards are keyed by decoding settings only, so changing a filter reuses finished shards.


rule generate_synthetic:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(synthetic_artifact_by_shard_key(w.shard_key).teacher),
        tokenizer=f"{R}/tokenizer",
        dataset=lambda w: f"{R}/data/{synthetic_artifact_by_shard_key(w.shard_key).dataset}",
    output:
        out_dir=directory(f"{R}/teacher/synthetic_shards/{{shard_key}}/shard{{shard}}of{{nshards}}"),
        energy_json=energy_json("teacher.generate.{shard_key}.shard{shard}of{nshards}"),
    params:
        synthetic=lambda w: generation_settings(synthetic_artifact_by_shard_key(w.shard_key)),
        shard=lambda w: int(w.shard),
        num_shards=lambda w: int(w.nshards),
        seed=CFG["seed"],
        stage_id=lambda w: f"teacher.generate.{w.shard_key}.shard{w.shard}of{w.nshards}",
        role="teacher",
        artifact=lambda w: w.shard_key,
    log:
        f"{R}/logs/generate_synthetic/{{shard_key}}.shard{{shard}}of{{nshards}}.log",
    benchmark:
        f"{R}/benchmarks/generate_synthetic/{{shard_key}}.shard{{shard}}of{{nshards}}.tsv"
    threads: threads_for("generate_synthetic")
    resources:
        **resources_for("generate_synthetic"),
    script:
        "../scripts/stage.py"


rule merge_synthetic:
    input:
        **METER_INPUTS,
        shards=lambda w: shard_dirs(w.artifact),
        dataset=lambda w: f"{R}/data/{PLAN.artifacts[w.artifact].dataset}",
    output:
        out_dir=directory(f"{R}/teacher/synthetic/{{artifact}}"),
        energy_json=energy_json("teacher.merge.{artifact}"),
    params:
        synthetic=lambda w: PLAN.artifacts[w.artifact].params,
        stage_id=lambda w: f"teacher.merge.{w.artifact}",
        role="teacher",
        artifact=lambda w: w.artifact,
    log:
        f"{R}/logs/merge_synthetic/{{artifact}}.log",
    benchmark:
        f"{R}/benchmarks/merge_synthetic/{{artifact}}.tsv"
    threads: 1
    resources:
        **resources_for("merge_synthetic"),
    script:
        "../scripts/stage.py"
