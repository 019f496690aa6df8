# Shared helpers: what every rule repeats, code dependencies of each stage, the file lists rules
# expand, and what each job asks the scheduler for (threads, mem_mb, runtime, gpu).

from tdabench import resources as estimates
from tdabench.codedeps import stage_sources
from tdabench.pipeline.common import stage_module

# Every rule runs its stage through one script (tdabench.pipeline.common.STAGES maps rule -> entry
# point) in one conda environment (for --sdm conda users).
STAGE = "../scripts/stage.py"
ENV = "../../envs/tdabench.yaml"

# Keys of config sections that feed one library dataclass (only these rerun a rule).
EXTRACTION_KEYS = ("components", "batch_size", "max_component_dim", "sketch_seed", "autocast")
TRAIN_KEYS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "warmup_fraction",
    "label_smoothing",
    "precision",
)


def stage_code(rule):
    """Library files the rule's stage runs (module + transitive tdabench imports), relative to the
    working directory so that moving the checkout together with its results reruns nothing."""
    return [os.path.relpath(p) for p in stage_sources(stage_module(rule), SRC / "tdabench")]


def keys(section, names):
    """Only the named keys of a config section (the ones a rule's stage reads)."""
    return {k: config[section][k] for k in names}


def training(section):
    """TrainConfig of `pretrain` / `finetune`: its training keys plus the study seed."""
    return {**keys(section, TRAIN_KEYS), "seed": config["seed"]}


def base_model():
    """The model fine-tuning starts from: a produced directory, a local directory or a hub name."""
    kind = config["model"]["kind"]
    return {"tiny": "results/models/base", "gguf": "results/models/converted"}.get(
        kind, config["model"]["name_or_path"]
    )


def attributed_model():
    """The model whose gradients are attributed (fine-tuned, or the base model as it is)."""
    return "results/models/finetuned" if config["finetune"]["enabled"] else base_model()


def local(ref):
    """`ref` as a Snakemake input when it is a file or folder (a hub name is not)."""
    return [ref] if ref.startswith("results/") or os.path.exists(ref) else []


def model_param(ref):
    """Params value of a model: the rule's `model` input when local, else the hub name."""
    return lambda wildcards, input: input.model[0] if local(ref) else ref


def stream_extraction():
    """ExtractionConfig of a streamed similarity job: gradients' keys, capped by similarity's own
    max_component_dim (null: exact), so the cache may be sketched while the store is exact."""
    return {**keys("gradients", EXTRACTION_KEYS), "max_component_dim": config["similarity"]["max_component_dim"]}


def similarity_source():
    """cache | stream: similarity.source, with auto resolved against the estimated gradient cache."""
    source = config["similarity"]["source"]
    if source != "auto":
        return source
    n = estimates.table_rows("results/data/train.parquet", config) + estimates.table_rows(query_table(), config)
    return "stream" if estimates.cache_bytes(config, n) > config["gradients"]["max_cache_gb"] * 1e9 else "cache"


def query_table():
    """All queries: the data's, plus model-generated ones when that setting is requested."""
    if "model_generated" in config["dataset"]["settings"]:
        return "results/data/queries_all.parquet"
    return "results/data/queries.parquet"


def n_shards(split):
    return config["gradients"]["shards"] if split == "train" else 1


def gradient_shards(split):
    return expand("results/gradients/{split}/shard-{shard}.h5", split=split, shard=range(n_shards(split)))


def projection_methods():
    """Projection methods of the full gradient (select_then_project has its own rule)."""
    return [m for m in config["projection"]["methods"] if m != "select_then_project"]


def selected_projections():
    if "select_then_project" not in config["projection"]["methods"]:
        return []
    return expand("results/projection/select_then_project/{setting}.h5", setting=config["dataset"]["settings"])


wildcard_constraints:
    split="train|queries",
    shard=r"\d+",
    part=r"\d+",
    setting=r"[a-z_]+",
    method=r"[a-z_]+",


CLUSTER_THREADS = 8  # threads of a model job on a cluster when resources.threads is not set


def max_threads():
    """Most threads of any job: resources.threads, else the invocation's --cores (locally), else
    CLUSTER_THREADS (a cluster executor has no --cores). Snakemake also caps at --cores locally."""
    cap = config["resources"]["threads"]
    if cap:
        return cap
    cores = workflow.resource_settings.cores
    return cores if isinstance(cores, int) and not workflow.resource_settings.nodes else CLUSTER_THREADS


def model_resources(name, rows=lambda wildcards, input: 0):
    """Resources of the model-running rule `name`. Memory and runtime come from the model's size, the rows
    one job handles (`rows(wildcards, input)`) and the attempt; gpu is added when device is cuda."""

    def get(key):
        return lambda wildcards, input, attempt: estimates.estimate(name, config, rows(wildcards, input), attempt)[key]

    res = {"mem_mb": get("mem_mb"), "runtime": get("runtime")}
    # An explicit cuda[:N] asks for a GPU (checked here, not through tdabench.device: the Snakefile
    # is parsed by every invocation and every cluster job, and that module imports torch).
    if config["device"].startswith("cuda") and name in estimates.GPU_RULES:
        res["gpu"] = config["resources"]["gpus"]
    return res


def io_resources():
    """Resources of a store- and table-reading job, which grow with its input size."""

    def get(key):
        return lambda wildcards, input, attempt: estimates.estimate_io(config, input.size_mb, attempt)[key]

    return {"mem_mb": get("mem_mb"), "runtime": get("runtime")}


def rows_of(name):
    """rows(wildcards, input) of the table named `name` among a rule's inputs."""
    return lambda wildcards, input: estimates.table_rows(input[name], config)


def shard_rows(wildcards, input):
    """Rows of one gradients job: its split's table over the split's shards."""
    table = input.train if wildcards.split == "train" else input.queries
    return -(-estimates.table_rows(table, config) // n_shards(wildcards.split))
