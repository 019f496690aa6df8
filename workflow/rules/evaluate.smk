rule costs:
    """Time to represent new samples with each method, all measured in one run on the same queries."""
    input:
        model=local(ATTRIBUTED_MODEL),
        code=stage_code("costs"),
        queries=QUERY_TABLE,
        selection=expand("results/selection/{setting}.parquet", setting=SETTINGS),
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
        **stage_params("costs", model=model_param(ATTRIBUTED_MODEL)),
    script:
        STAGE


rule evaluate:
    """Score every method on the held-out queries of every split: one tidy table."""
    input:
        code=stage_code("evaluate"),
        train="results/data/train.parquet",
        queries=QUERY_TABLE,
        similarity=expand("results/similarity/{setting}.h5", setting=SETTINGS),
        selection=expand("results/selection/{setting}.parquet", setting=SETTINGS),
        projection=expand("results/projection/{method}.h5", method=plan.projection_methods(config)),
        selected=plan.selected_projections(config),
        costs="results/evaluation/costs.parquet",
        bm25_candidates=plan.evaluation_candidates(config),
    output:
        metrics="results/evaluation/metrics.parquet",
        candidates="results/evaluation/candidates.parquet",
        in_sample="results/evaluation/in_sample.parquet",
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
        **stage_params("evaluate"),
    script:
        STAGE


rule summary:
    """summary.md, plots (PNG + SVG), the resolved config and the results manifest (every result
    file with its hash and rule); headline metrics, per-method runs, table and plots into MLflow."""
    input:
        code=stage_code("summary"),
        metrics="results/evaluation/metrics.parquet",
        candidates="results/evaluation/candidates.parquet",
        in_sample="results/evaluation/in_sample.parquet",
        similarity=expand("results/similarity/{setting}.h5", setting=SETTINGS),
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
        manifest="results/manifest.json",
        answer="results/answer.txt",
    log:
        "logs/summary.log",
    conda:
        ENV
    params:
        **stage_params("summary"),
    script:
        STAGE
