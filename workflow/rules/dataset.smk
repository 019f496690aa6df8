rule background:
    """What the base model is pre-trained on (background settings only: planted settings never rerun it)."""
    input:
        code=stage_code("background"),
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
