rule background:
    """What the base model is pre-trained on (background settings only: planted settings never rerun it)."""
    input:
        code=stage_code("background"),
        data=plan.user_data(config, ("train",)),
    output:
        background="results/data/background.parquet",
    log:
        "logs/background.log",
    benchmark:
        "benchmarks/background.tsv"
    conda:
        ENV
    params:
        **stage_params("background"),
    script:
        STAGE


rule dataset:
    """The benchmark: training examples (background + planted) and queries with ground truth."""
    input:
        code=stage_code("dataset"),
        background=plan.background(config),
        data=plan.user_data(config),
    output:
        train="results/data/train.parquet",
        queries="results/data/queries.parquet",
    log:
        "logs/dataset.log",
    benchmark:
        "benchmarks/dataset.tsv"
    conda:
        ENV
    params:
        **stage_params("dataset"),
    script:
        STAGE


rule bm25_candidates:
    """Each query's BM25 candidate set (the published protocol), written once for every stage that ranks within them."""
    input:
        code=stage_code("bm25_candidates"),
        train="results/data/train.parquet",
        queries=QUERY_TABLE,
    output:
        candidates=plan.CANDIDATES,
    log:
        "logs/bm25_candidates.log",
    benchmark:
        "benchmarks/bm25_candidates.tsv"
    conda:
        ENV
    params:
        **stage_params("bm25_candidates"),
    script:
        STAGE
