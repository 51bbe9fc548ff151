# Synthetic-data SFT, teacher side: scatter generation over N shards (one job each, one GPU each on a cluster),
# gather and filter. Shards are keyed by decoding settings only, so changing a filter reuses finished shards.


rule generate_synthetic:
    input:
        **METER_INPUTS,
        teacher=lambda w: model_dir_for(
            synthetic_artifact_by_shard_key(w.shard_key).teacher
        ),
        tokenizer=lambda w: tokenizer_dir_for(
            synthetic_artifact_by_shard_key(w.shard_key).teacher
        ),
        dataset=lambda w: f"{R}/data/{synthetic_artifact_by_shard_key(w.shard_key).dataset}",
    output:
        out_dir=directory(
            f"{R}/teacher/synthetic_shards/{{shard_key}}/shard{{shard}}of{{nshards}}"
        ),
        energy_json=stage_energy_json("generate_synthetic"),
    log:
        stage_log("generate_synthetic"),
    benchmark:
        stage_benchmark("generate_synthetic")
    conda:
        CONDA_ENV
    threads: threads_for("generate_synthetic")
    resources:
        **resources_for("generate_synthetic"),
    params:
        synthetic=lambda w: generation_settings(
            synthetic_artifact_by_shard_key(w.shard_key)
        ),
        shard=lambda w: int(w.shard),
        num_shards=lambda w: int(w.nshards),
        seed=CFG["seed"],
        artifact=lambda w: w.shard_key,
    script:
        "../scripts/stage.py"


rule merge_synthetic:
    input:
        **METER_INPUTS,
        shards=lambda w: shard_dirs(w.artifact),
        dataset=lambda w: f"{R}/data/{PLAN.artifacts[w.artifact].dataset}",
    output:
        out_dir=directory(f"{R}/teacher/synthetic/{{artifact}}"),
        energy_json=stage_energy_json("merge_synthetic"),
    log:
        stage_log("merge_synthetic"),
    benchmark:
        stage_benchmark("merge_synthetic")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        **resources_for("merge_synthetic"),
    params:
        synthetic=lambda w: PLAN.artifacts[w.artifact].params,
        artifact=lambda w: w.artifact,
    script:
        "../scripts/stage.py"
