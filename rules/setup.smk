# Setup and data: run once per run, shown in the table but not charged to distillation (role setup/data).


rule config_snapshot:
    localrule: True
    output:
        config=f"{R}/config/merged_config.yaml",
        plan=f"{R}/config/plan.json",
    params:
        config=CFG,
    log:
        f"{R}/logs/config_snapshot.log",
    benchmark:
        f"{R}/benchmarks/config_snapshot.tsv"
    script:
        "../scripts/config_snapshot.py"


rule environment_snapshot:
    localrule: True
    output:
        f"{R}/env/environment.json",
    log:
        f"{R}/logs/environment_snapshot.log",
    benchmark:
        f"{R}/benchmarks/environment_snapshot.tsv"
    script:
        "../scripts/environment_snapshot.py"


rule idle_baseline:
    """Idle power of each device, measured once per run on the hardware the stages use."""
    input:
        environment=f"{R}/env/environment.json",
        prerun=f"{R}/env/prerun.json",
    output:
        f"{R}/energy/idle.json",
    params:
        seconds=CFG["energy"]["idle_seconds"],
        energy=ENERGY,
    log:
        f"{R}/logs/idle_baseline.log",
    benchmark:
        f"{R}/benchmarks/idle_baseline.tsv"
    threads: 1
    resources:
        **resources_for("idle_baseline"),
    script:
        "../scripts/idle_baseline.py"


rule prepare_data:
    input:
        **METER_INPUTS,
    output:
        out_dir=directory(f"{R}/data/{{dataset}}"),
        energy_json=energy_json("data.prepare.{dataset}"),
    params:
        dataset_name=lambda w: w.dataset,
        spec=lambda w: CFG["datasets"][w.dataset],
        seed=CFG["seed"],
        tokenizer=CFG["tokenizer"]["source"] if CFG["tokenizer"]["source"] != "train" else None,
        stage_id=lambda w: f"data.prepare.{w.dataset}",
        role="data",
    log:
        f"{R}/logs/prepare_data/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_data/{{dataset}}.tsv"
    threads: 1
    resources:
        **resources_for("prepare_data"),
    script:
        "../scripts/stage.py"


rule prepare_tokenizer:
    input:
        **METER_INPUTS,
        datasets=expand(f"{R}/data/{{dataset}}", dataset=sorted(CFG["datasets"])),
    output:
        out_dir=directory(f"{R}/tokenizer"),
        energy_json=energy_json("setup.tokenizer"),
    params:
        source=CFG["tokenizer"]["source"],
        vocab_size=CFG["tokenizer"]["vocab_size"],
        seed=CFG["seed"],
        stage_id="setup.tokenizer",
        role="setup",
    log:
        f"{R}/logs/prepare_tokenizer.log",
    benchmark:
        f"{R}/benchmarks/prepare_tokenizer.tsv"
    threads: 1
    resources:
        **resources_for("prepare_tokenizer"),
    script:
        "../scripts/stage.py"


TEACHER_DATASET = CFG["teacher"]["train"].get("dataset") or sorted(CFG["datasets"])[0]


rule prepare_teacher:
    """Embedded: train the teacher here (role setup). Cluster: point at the HF id / path (tokenizer checked)."""
    input:
        **METER_INPUTS,
        tokenizer=f"{R}/tokenizer",
        dataset=f"{R}/data/{TEACHER_DATASET}",
    output:
        out_dir=directory(f"{R}/models/teacher"),
        energy_json=energy_json("setup.teacher"),
    params:
        teacher=CFG["teacher"],
        training=teacher_training(CFG),
        seed=CFG["seed"],
        stage_id="setup.teacher",
        role="setup",
    log:
        f"{R}/logs/prepare_teacher.log",
    benchmark:
        f"{R}/benchmarks/prepare_teacher.tsv"
    threads: threads_for("prepare_teacher")
    resources:
        **resources_for("prepare_teacher"),
    script:
        "../scripts/stage.py"


rule init_student:
    input:
        **METER_INPUTS,
        tokenizer=f"{R}/tokenizer",
    output:
        out_dir=directory(f"{R}/models/init/{{student}}"),
        energy_json=energy_json("setup.init.{student}"),
    params:
        student=lambda w: CFG["students"][w.student],
        seed=CFG["seed"],
        stage_id=lambda w: f"setup.init.{w.student}",
        role="setup",
    log:
        f"{R}/logs/init_student/{{student}}.log",
    benchmark:
        f"{R}/benchmarks/init_student/{{student}}.tsv"
    threads: 1
    resources:
        **resources_for("init_student"),
    script:
        "../scripts/stage.py"
