# Reduce: the similarity store (seam of every select-side analysis), component selection on the
# selection queries, and random projections of the full gradient.


rule similarity:
    """Per-component query x train dot products and squared norms for one query setting."""
    input:
        code=stage_code("similarity"),
        train=gradient_shards("train"),
        query_grads=gradient_shards("queries"),
        queries="results/data/queries.parquet",
    output:
        similarity="results/similarity/{setting}.h5",
    params:
        block_rows=config["similarity"]["block_rows"],
        dtype=config["similarity"]["dtype"],
    log:
        "logs/similarity/{setting}.log",
    benchmark:
        "benchmarks/similarity/{setting}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/similarity.py"


rule selection:
    """Best single component and greedy forward selection, chosen on the selection queries."""
    input:
        code=stage_code("selection"),
        similarity="results/similarity/{setting}.h5",
    output:
        selection="results/selection/{setting}.parquet",
    params:
        selection_fraction=config["selection"]["selection_fraction"],
        split_seed=config["selection"]["split_seed"],
        objective=config["selection"]["objective"],
    log:
        "logs/selection/{setting}.log",
    benchmark:
        "benchmarks/selection/{setting}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/selection.py"


rule projection:
    """Seeded random projections of every sample's full gradient to k dimensions."""
    input:
        code=stage_code("projection"),
        train=gradient_shards("train"),
        query_grads=gradient_shards("queries"),
    output:
        projection="results/projection/k{k}.h5",
    params:
        kind=config["projection"]["kind"],
        seeds=config["projection"]["seeds"],
        nonzeros=config["projection"]["nonzeros"],
    log:
        "logs/projection/k{k}.log",
    benchmark:
        "benchmarks/projection/k{k}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/projection.py"
