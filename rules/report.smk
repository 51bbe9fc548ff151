# Roll-up: every stage JSON and eval result -> the comparison table and figures. Cheap, so it runs locally, and it
# is the run's last job: it reads the device energy counters again as the run's end (reconciliation.md).
# `snakemake --report report.html` (or report.zip) bundles the outputs marked report() below.


rule rollup:
    localrule: True
    input:
        config=f"{R}/config/merged_config.yaml",
        plan=f"{R}/config/plan.json",
        stages=[energy_json(s) for s in PLAN.all_stage_ids()],
        evals=[f"{R}/eval/{m}/{d}.json" for m, d in PLAN.eval_units],
    output:
        csv=report(f"{R}/summary/comparison.csv", caption="../report/comparison.rst", category="1. Comparison"),
        md=f"{R}/summary/comparison.md",
        html=report(f"{R}/summary/report.html", caption="../report/summary_html.rst", category="1. Comparison"),
        references=report(f"{R}/summary/references.csv", caption="../report/references.rst",
                          category="1. Comparison"),
        stages=report(f"{R}/summary/stages.csv", caption="../report/stages.rst", category="3. Stages"),
        pareto=report(f"{R}/summary/pareto.png", caption="../report/pareto.rst", category="2. Figures"),
        by_role=report(f"{R}/summary/energy_by_role.png", caption="../report/energy_by_role.rst",
                       category="2. Figures"),
        timeline=report(f"{R}/summary/run_timeline.png", caption="../report/run_timeline.rst",
                        category="2. Figures"),
        reconciliation=report(f"{R}/summary/reconciliation.md", caption="../report/reconciliation.rst",
                              category="1. Comparison"),
        reconciliation_json=f"{R}/summary/reconciliation.json",
    params:
        results_dir=R,
    log:
        f"{R}/logs/rollup.log",
    benchmark:
        f"{R}/benchmarks/rollup.tsv"
    script:
        "../scripts/rollup.py"


rule wandb_log:
    """Optional (report.wandb.enabled): log the finished run to Weights & Biases, offline by default; upload later
    with `wandb sync`. It only reads the roll-up, so it is not a metered stage."""
    localrule: True
    input:
        csv=f"{R}/summary/comparison.csv",
        stages=f"{R}/summary/stages.csv",
    output:
        f"{R}/summary/wandb_runs.txt",
    params:
        results_dir=R,
        config=CFG,
    log:
        f"{R}/logs/wandb_log.log",
    benchmark:
        f"{R}/benchmarks/wandb_log.tsv"
    script:
        "../scripts/wandb_log.py"
