rule gradients:
    """Per-sample loss gradients of one shard of a split, one HDF5 dataset per component."""
    input:
        model=local(ATTRIBUTED_MODEL),
        code=stage_code("gradients"),
        train="results/data/train.parquet",
        queries=QUERY_TABLE,
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
        **model_resources("gradients", gradient_job_rows),
    params:
        **stage_params(
            "gradients",
            model=model_param(ATTRIBUTED_MODEL),
            shards=lambda wildcards: plan.n_shards(config, wildcards.split),
        ),
    script:
        STAGE
