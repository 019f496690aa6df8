rule costs:
    """Time to represent new samples with each method, all measured in one run on the same queries."""
    input:
        code=stage_code("costs"),
        model="results/models/finetuned",
        queries="results/data/queries.parquet",
        selection=expand("results/selection/{setting}.parquet", setting=config["dataset"]["settings"]),
    output:
        costs="results/evaluation/costs.parquet",
    params:
        settings=config["dataset"]["settings"],
        cost_samples=config["evaluation"]["cost_samples"],
        methods=config["projection"]["methods"],
        dims=config["projection"]["dims"],
        nonzeros=config["projection"]["nonzeros"],
        select_kind=config["projection"]["select_kind"],
        gradients=config["gradients"],
        tokenize=config["tokenize"],
    log:
        "logs/costs.log",
    benchmark:
        "benchmarks/costs.tsv"
    # Every core: timings are only comparable when no other job shares the machine.
    threads: workflow.cores
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/costs.py"


rule evaluate:
    """Score every method on the held-out queries of every split: one tidy table."""
    input:
        code=stage_code("evaluate"),
        train="results/data/train.parquet",
        queries="results/data/queries.parquet",
        similarity=expand("results/similarity/{setting}.h5", setting=config["dataset"]["settings"]),
        selection=expand("results/selection/{setting}.parquet", setting=config["dataset"]["settings"]),
        projection=expand("results/projection/{method}.h5", method=projection_methods()),
        selected=selected_projections(),
        costs="results/evaluation/costs.parquet",
    output:
        metrics="results/evaluation/metrics.parquet",
    params:
        settings=config["dataset"]["settings"],
        recall_at=config["evaluation"]["recall_at"],
        selection_fraction=config["selection"]["selection_fraction"],
        n_splits=config["selection"]["n_splits"],
        split_seed=config["selection"]["split_seed"],
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
        plot_cost="results/evaluation/top1_vs_cost.png",
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
