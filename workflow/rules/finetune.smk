rule pretrain:
    """The tiny default base model and its tokenizer, trained on the background data only."""
    input:
        code=stage_code("pretrain"),
        background="results/data/background.parquet",
    output:
        model=directory("results/models/base"),
        report="results/models/pretrain_report.json",
    log:
        "logs/pretrain.log",
    benchmark:
        "benchmarks/pretrain.tsv"
    conda:
        ENV
    threads: max_threads()
    resources:
        **model_resources("pretrain", rows_of("background")),
    params:
        numerics=config["numerics"],
        kind=config["dataset"]["kind"],
        model=config["model"]["tiny"],
        tokenize=config["tokenize"],
        train=training("pretrain"),
        seed=config["seed"],
        device=config["device"],
    script:
        STAGE


rule convert:
    """A GGUF model, dequantised once and saved as a normal checkpoint."""
    input:
        code=stage_code("convert"),
    output:
        model=directory("results/models/converted"),
    log:
        "logs/convert.log",
    benchmark:
        "benchmarks/convert.tsv"
    conda:
        ENV
    threads: max_threads()
    resources:
        **model_resources("convert"),
    params:
        numerics=config["numerics"],
        gguf=config["model"]["gguf"],
    script:
        STAGE


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
    log:
        "logs/finetune.log",
    benchmark:
        "benchmarks/finetune.tsv"
    conda:
        ENV
    threads: max_threads()
    resources:
        **model_resources("finetune", rows_of("train")),
    params:
        numerics=config["numerics"],
        base=model_param(base_model()),
        tokenize=config["tokenize"],
        train=training("finetune"),
        eval_batch_size=config["finetune"]["eval_batch_size"],
        device=config["device"],
    script:
        STAGE


rule generate:
    """Model-generated queries: the model's greedy answer to each paraphrased prompt."""
    input:
        model=local(attributed_model()),
        code=stage_code("generate"),
        queries="results/data/queries.parquet",
    output:
        queries="results/data/queries_all.parquet",
    log:
        "logs/generate.log",
    benchmark:
        "benchmarks/generate.tsv"
    conda:
        ENV
    threads: max_threads()
    resources:
        **model_resources("generate", rows_of("queries")),
    params:
        numerics=config["numerics"],
        model=model_param(attributed_model()),
        max_length=config["tokenize"]["max_length"],
        max_new_tokens=config["dataset"]["generate_max_tokens"],
        batch_size=config["finetune"]["eval_batch_size"],
        device=config["device"],
    script:
        STAGE
