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
        numerics=config["numerics"],
        kind=config["dataset"]["kind"],
        synthetic={
            key: config["dataset"]["synthetic"][key]
            for key in ("n_entities", "background_facts_per_entity", "train_templates")
        },
        files=config["dataset"]["files"],
        huggingface=config["dataset"]["huggingface"],
        seed=config["seed"],
    script:
        STAGE


rule dataset:
    """The benchmark: training examples (background + planted) and queries with ground truth."""
    input:
        code=stage_code("dataset"),
        background=["results/data/background.parquet"] if config["dataset"]["kind"] == "synthetic" else [],
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
        numerics=config["numerics"],
        kind=config["dataset"]["kind"],
        synthetic=config["dataset"]["synthetic"],
        files=config["dataset"]["files"],
        huggingface=config["dataset"]["huggingface"],
        seed=config["seed"],
    script:
        STAGE
