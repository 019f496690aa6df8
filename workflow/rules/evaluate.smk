rule evaluate:
    """Score every method on the held-out queries: one tidy table."""
    input:
        code=stage_code("evaluate"),
        similarity=expand("results/similarity/{setting}.h5", setting=config["dataset"]["settings"]),
        selection=expand("results/selection/{setting}.parquet", setting=config["dataset"]["settings"]),
        projection=expand("results/projection/k{k}.h5", k=config["projection"]["dims"]),
    output:
        metrics="results/evaluation/metrics.parquet",
    params:
        settings=config["dataset"]["settings"],
        recall_at=config["evaluation"]["recall_at"],
        selection_fraction=config["selection"]["selection_fraction"],
        split_seed=config["selection"]["split_seed"],
        seeds=config["projection"]["seeds"],
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/evaluate.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/evaluate.py"


rule summary:
    """summary.md and plots; headline metrics, table and plots into the MLflow parent run."""
    input:
        code=stage_code("summary"),
        metrics="results/evaluation/metrics.parquet",
    output:
        summary="results/summary.md",
        plot_top1="results/evaluation/top1_vs_dim.png",
        plot_mrr="results/evaluation/mrr_vs_dim.png",
    params:
        settings=config["dataset"]["settings"],
    log:
        "logs/summary.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/summary.py"
