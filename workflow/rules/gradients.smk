rule gradients:
    """Per-sample loss gradients of one shard of a split, one HDF5 dataset per component."""
    input:
        model=local(attributed_model()),
        code=stage_code("gradients"),
        train="results/data/train.parquet",
        queries=query_table(),
    output:
        store="results/gradients/{split}/shard-{shard}.h5",
    params:
        model=model_param(attributed_model()),
        shards=lambda wc: n_shards(wc.split),
        components=config["gradients"]["components"],
        batch_size=config["gradients"]["batch_size"],
        dtype=config["gradients"]["dtype"],
        max_component_dim=config["gradients"]["max_component_dim"],
        sketch_seed=config["gradients"]["sketch_seed"],
        max_cache_gb=config["gradients"]["max_cache_gb"],
        autocast=config["gradients"]["autocast"],
        verify=config["gradients"]["verify"],
        verify_tolerance=config["gradients"]["verify_tolerance"],
        tokenize=config["tokenize"],
    log:
        "logs/gradients/{split}-{shard}.log",
    benchmark:
        "benchmarks/gradients/{split}-{shard}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/gradients.py"
