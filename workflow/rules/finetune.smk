rule pretrain:
    """The tiny default base model and its tokenizer, trained on the background data only."""
    input:
        code=stage_code("pretrain"),
        background="results/data/background.parquet",
    output:
        model=directory("results/models/base"),
        report="results/models/pretrain_report.json",
    params:
        kind=config["dataset"]["kind"],
        model=config["model"]["tiny"],
        tokenize=config["tokenize"],
        train=config["pretrain"],
        seed=config["seed"],
    log:
        "logs/pretrain.log",
    benchmark:
        "benchmarks/pretrain.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/pretrain.py"


rule convert:
    """A GGUF model, dequantised once and saved as a normal checkpoint."""
    input:
        code=stage_code("convert"),
    output:
        model=directory("results/models/converted"),
    params:
        gguf=config["model"]["gguf"],
    log:
        "logs/convert.log",
    benchmark:
        "benchmarks/convert.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/convert.py"


rule finetune:
    """Train the base model on the training set until the planted facts are learned."""
    input:
        model=local(base_model()),
        code=stage_code("finetune"),
        train="results/data/train.parquet",
        queries="results/data/queries.parquet",
    output:
        model=directory("results/models/finetuned"),
        report="results/models/finetune_report.json",
    params:
        base=model_param(base_model()),
        tokenize=config["tokenize"],
        train=config["finetune"],
        seed=config["seed"],
    log:
        "logs/finetune.log",
    benchmark:
        "benchmarks/finetune.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/finetune.py"


rule generate:
    """Model-generated queries: the model's greedy answer to each paraphrased prompt."""
    input:
        model=local(attributed_model()),
        code=stage_code("generate"),
        queries="results/data/queries.parquet",
    output:
        queries="results/data/queries_all.parquet",
    params:
        model=model_param(attributed_model()),
        max_length=config["tokenize"]["max_length"],
        max_new_tokens=config["dataset"]["generate_max_tokens"],
        batch_size=config["finetune"]["eval_batch_size"],
    log:
        "logs/generate.log",
    benchmark:
        "benchmarks/generate.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../../envs/tdabench.yaml"
    script:
        "../scripts/generate.py"
