# Prerun: once per run, on the same kind of node as the stages (a GPU job under the h100/l40s presets), check that
# the hardware matches config `hardware:` (GPU model, memory, enforced power limit = power_cap_w when set), burn the
# GPUs in for hardware.burn_in_s seconds, and record the facts. The idle baseline is measured after it, so it sees
# the card at its working temperature. Card settings are read, never changed (docs/SLURM.md).


rule prerun:
    output:
        f"{R}/env/prerun.json",
    log:
        f"{R}/logs/prerun.log",
    benchmark:
        f"{R}/benchmarks/prerun.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        **resources_for("prerun"),
    params:
        hardware=CFG.get("hardware") or {},
        energy=ENERGY,
    script:
        "../scripts/prerun.py"
