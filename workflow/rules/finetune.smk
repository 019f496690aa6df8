rule finetune:
    """Train the tiny model (and its tokenizer) on the training set; check the planted facts stuck."""
    input:
        code=stage_code("finetune"),
        train="results/data/train.parquet",
        queries="results/data/queries.parquet",
    output:
        model=directory("results/models/finetuned"),
        report="results/models/finetune_report.json",
    params:
        model=config["model"]["tiny"],
        tokenize=config["tokenize"],
        train=config["finetune"],
        seed=config["seed"],
    log:
        "logs/finetune.log",
    benchmark:
        "benchmarks/finetune.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/finetune.py"
