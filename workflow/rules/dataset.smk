rule dataset:
    """Build the benchmark: training examples (planted + background) and queries with ground truth."""
    input:
        code=stage_code("dataset"),
    output:
        train="results/data/train.parquet",
        queries="results/data/queries.parquet",
    params:
        kind=config["dataset"]["kind"],
        settings=config["dataset"]["settings"],
        synthetic=config["dataset"]["synthetic"],
        seed=config["seed"],
    log:
        "logs/dataset.log",
    benchmark:
        "benchmarks/dataset.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/dataset.py"
