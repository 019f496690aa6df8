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
        **stage_params("pretrain"),
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
        **stage_params("convert"),
    script:
        STAGE


rule finetune:
    """Train the base model on the training set until the planted facts are learned."""
    input:
        model=local(BASE_MODEL),
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
        **stage_params("finetune", base=model_param(BASE_MODEL)),
    script:
        STAGE


rule generate:
    """Model-generated queries: the model's greedy answer to each paraphrased prompt."""
    input:
        model=local(ATTRIBUTED_MODEL),
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
        **stage_params("generate", model=model_param(ATTRIBUTED_MODEL)),
    script:
        STAGE
