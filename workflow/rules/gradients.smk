rule gradients:
    """Per-sample loss gradients of one shard of a split, one HDF5 dataset per component."""
    input:
        model=local(attributed_model()),
        code=stage_code("gradients"),
        train="results/data/train.parquet",
        queries=query_table(),
    output:
        store="results/gradients/{split}/shard-{shard}.h5",
    log:
        "logs/gradients/{split}-{shard}.log",
    benchmark:
        "benchmarks/gradients/{split}-{shard}.tsv"
    conda:
        ENV
    threads: max_threads()
    resources:
        **model_resources("gradients", shard_rows),
    params:
        numerics=config["numerics"],
        model=model_param(attributed_model()),
        shards=lambda wc: n_shards(wc.split),
        extraction=keys("gradients", EXTRACTION_KEYS),
        dtype=config["gradients"]["dtype"],
        max_cache_gb=config["gradients"]["max_cache_gb"],
        verify=config["gradients"]["verify"],
        verify_tolerance=config["gradients"]["verify_tolerance"],
        tokenize=config["tokenize"],
        device=config["device"],
    script:
        STAGE
