rule gradients:
    """Per-sample loss gradients of one shard of a split, one HDF5 dataset per component."""
    input:
        code=stage_code("gradients"),
        model="results/models/finetuned",
        train="results/data/train.parquet",
        queries="results/data/queries.parquet",
    output:
        store="results/gradients/{split}/shard-{shard}.h5",
    params:
        shards=lambda wc: n_shards(wc.split),
        components=config["gradients"]["components"],
        batch_size=config["gradients"]["batch_size"],
        dtype=config["gradients"]["dtype"],
        max_component_dim=config["gradients"]["max_component_dim"],
        sketch_seed=config["gradients"]["sketch_seed"],
        max_cache_gb=config["gradients"]["max_cache_gb"],
        autocast=config["gradients"]["autocast"],
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
