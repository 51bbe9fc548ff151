# Setup and data: run once per run, shown in the table but not charged to distillation (role setup/data).


rule config_snapshot:
    output:
        config=f"{R}/config/merged_config.yaml",
        plan=f"{R}/config/plan.json",
    log:
        f"{R}/logs/config_snapshot.log",
    benchmark:
        f"{R}/benchmarks/config_snapshot.tsv"
    localrule: True
    conda:
        CONDA_ENV
    params:
        config=CFG,
    script:
        "../scripts/config_snapshot.py"


rule environment_snapshot:
    output:
        f"{R}/env/environment.json",
    log:
        f"{R}/logs/environment_snapshot.log",
    benchmark:
        f"{R}/benchmarks/environment_snapshot.tsv"
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/environment_snapshot.py"


rule idle_baseline:
    """Idle power of each device, measured once per run on the hardware the stages use."""
    input:
        environment=f"{R}/env/environment.json",
        prerun=f"{R}/env/prerun.json",
    output:
        f"{R}/energy/idle.json",
    log:
        f"{R}/logs/idle_baseline.log",
    benchmark:
        f"{R}/benchmarks/idle_baseline.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        **resources_for("idle_baseline"),
    params:
        seconds=CFG["energy"]["idle_seconds"],
        energy=ENERGY,
    script:
        "../scripts/idle_baseline.py"


rule prepare_data:
    input:
        **METER_INPUTS,
    output:
        out_dir=directory(f"{R}/data/{{dataset}}"),
        energy_json=stage_energy_json("prepare_data"),
    log:
        stage_log("prepare_data"),
    benchmark:
        stage_benchmark("prepare_data")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        **resources_for("prepare_data"),
    params:
        dataset_name=lambda w: w.dataset,
        spec=lambda w: CFG["datasets"][w.dataset],
        seed=CFG["seed"],
        tokenizer=(
            CFG["tokenizer"]["source"]
            if CFG["tokenizer"]["source"] != "train"
            else None
        ),
    script:
        "../scripts/stage.py"


rule prepare_tokenizer:
    input:
        **METER_INPUTS,
        datasets=expand(f"{R}/data/{{dataset}}", dataset=sorted(CFG["datasets"])),
    output:
        out_dir=directory(f"{R}/tokenizer"),
        energy_json=stage_energy_json("prepare_tokenizer"),
    log:
        stage_log("prepare_tokenizer"),
    benchmark:
        stage_benchmark("prepare_tokenizer")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        **resources_for("prepare_tokenizer"),
    params:
        source=CFG["tokenizer"]["source"],
        vocab_size=CFG["tokenizer"]["vocab_size"],
        seed=CFG["seed"],
    script:
        "../scripts/stage.py"


TEACHER_DATASET = CFG["teacher"]["train"].get("dataset") or sorted(CFG["datasets"])[0]


rule prepare_teacher:
    """Embedded: train the teacher here (role setup). Cluster: point at the HF id / path (tokenizer checked)."""
    input:
        **METER_INPUTS,
        **run_tokenizer_input("teacher"),
        dataset=f"{R}/data/{TEACHER_DATASET}",
    output:
        out_dir=directory(f"{R}/models/teacher"),
        energy_json=stage_energy_json("prepare_teacher"),
    log:
        stage_log("prepare_teacher"),
    benchmark:
        stage_benchmark("prepare_teacher")
    conda:
        CONDA_ENV
    threads: threads_for("prepare_teacher")
    resources:
        **resources_for("prepare_teacher"),
    params:
        teacher=CFG["teacher"],
        training=teacher_training(CFG),
        seed=CFG["seed"],
    script:
        "../scripts/stage.py"


rule init_student:
    input:
        unpack(init_student_inputs),
    output:
        out_dir=directory(f"{R}/models/init/{{student}}"),
        energy_json=stage_energy_json("init_student"),
    log:
        stage_log("init_student"),
    benchmark:
        stage_benchmark("init_student")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        **resources_for("init_student"),
    params:
        student=lambda w: CFG["students"][w.student],
        seed=CFG["seed"],
    script:
        "../scripts/stage.py"
