rule costs:
    """Time to represent new samples with each method, all measured in one run on the same queries."""
    input:
        model=local(attributed_model()),
        code=stage_code("costs"),
        queries=query_table(),
        selection=expand("results/selection/{setting}.parquet", setting=config["dataset"]["settings"]),
    output:
        costs="results/evaluation/costs.parquet",
    log:
        "logs/costs.log",
    benchmark:
        "benchmarks/costs.tsv"
    conda:
        ENV
    # All the cores a job may have: timings are only comparable when no other job shares the machine.
    threads: max_threads()
    resources:
        **model_resources("costs"),
    params:
        numerics=config["numerics"],
        model=model_param(attributed_model()),
        settings=config["dataset"]["settings"],
        cost_samples=config["evaluation"]["cost_samples"],
        costs=keys("projection", ("methods", "dims", "nonzeros", "select_kind")),
        extraction=keys("gradients", EXTRACTION_KEYS),
        tokenize=config["tokenize"],
        device=config["device"],
    script:
        STAGE


rule evaluate:
    """Score every method on the held-out queries of every split: one tidy table."""
    input:
        code=stage_code("evaluate"),
        train="results/data/train.parquet",
        queries=query_table(),
        similarity=expand("results/similarity/{setting}.h5", setting=config["dataset"]["settings"]),
        selection=expand("results/selection/{setting}.parquet", setting=config["dataset"]["settings"]),
        projection=expand("results/projection/{method}.h5", method=projection_methods()),
        selected=selected_projections(),
        costs="results/evaluation/costs.parquet",
    output:
        metrics="results/evaluation/metrics.parquet",
        candidates="results/evaluation/candidates.parquet",
        per_query="results/evaluation/per_query.parquet",
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/evaluate.tsv"
    conda:
        ENV
    resources:
        **io_resources(),
    params:
        numerics=config["numerics"],
        settings=config["dataset"]["settings"],
        recall_at=config["evaluation"]["recall_at"],
        candidates=config["evaluation"]["candidates"],
        bootstrap=config["evaluation"]["bootstrap"],
        bootstrap_seed=config["evaluation"]["bootstrap_seed"],
        selection_fraction=config["selection"]["selection_fraction"],
        n_splits=config["selection"]["n_splits"],
        split_seed=config["selection"]["split_seed"],
    script:
        STAGE


rule summary:
    """summary.md, plots (PNG + SVG) and the resolved config; headline metrics, per-method runs,
    table and plots into MLflow."""
    input:
        code=stage_code("summary"),
        metrics="results/evaluation/metrics.parquet",
        candidates="results/evaluation/candidates.parquet",
        similarity=expand("results/similarity/{setting}.h5", setting=config["dataset"]["settings"]),
    output:
        summary=report("results/summary.md", caption="../report/summary.rst", category="Summary"),
        config=report("results/config.yaml", caption="../report/config.rst", category="Configuration"),
        provenance="results/provenance.json",
        plot_top1=report(
            "results/evaluation/top1_vs_dim.png", caption="../report/top1_vs_dim.rst", category="Select vs project"
        ),
        plot_mrr=report(
            "results/evaluation/mrr_vs_dim.png", caption="../report/mrr_vs_dim.rst", category="Select vs project"
        ),
        plot_heatmap=report(
            "results/evaluation/single_component_heatmap.png",
            caption="../report/single_heatmap.rst",
            category="Where the signal lives",
        ),
        plot_greedy=report(
            "results/evaluation/greedy_curve.png",
            caption="../report/greedy_curve.rst",
            category="Where the signal lives",
        ),
        plot_cost=report(
            "results/evaluation/top1_vs_cost.png", caption="../report/top1_vs_cost.rst", category="Select vs project"
        ),
        svg=expand(
            "results/evaluation/{plot}.svg",
            plot=["top1_vs_dim", "mrr_vs_dim", "single_component_heatmap", "greedy_curve", "top1_vs_cost"],
        ),
    log:
        "logs/summary.log",
    conda:
        ENV
    params:
        numerics=config["numerics"],
        settings=config["dataset"]["settings"],
        study_config={key: value for key, value in config.items() if key not in NON_RESULT_KEYS},
    script:
        STAGE
