"""The study's files as the config shapes them: which models, tables, shards and stores exist.

The rules expand these (workflow/rules/*.smk); kept here so the file plan is one importable,
testable function of the config. Torch-free: the Snakefile imports it at parse time.
"""

from __future__ import annotations

import os

from tdabench import resources

BASE_MODEL_DIRS = {"tiny": "results/models/base", "gguf": "results/models/converted"}


def settings(config: dict) -> list[str]:
    """The query settings the study evaluates (dataset.settings)."""
    return list(config["dataset"]["settings"])


def base_model(config: dict) -> str:
    """The model fine-tuning starts from: a produced directory, a local directory or a hub name."""
    model = config["model"]
    return BASE_MODEL_DIRS.get(model["kind"], model["name_or_path"])


def attributed_model(config: dict) -> str:
    """The model whose gradients are attributed (fine-tuned, or the base model as it is)."""
    return "results/models/finetuned" if config["finetune"]["enabled"] else base_model(config)


def query_table(config: dict) -> str:
    """All queries: the data's, plus model-generated ones when that setting is requested."""
    if "model_generated" in config["dataset"]["settings"]:
        return "results/data/queries_all.parquet"
    return "results/data/queries.parquet"


CANDIDATES = "results/data/bm25_candidates.parquet"  # tdabench.candidates


def evaluation_candidates(config: dict) -> list[str]:
    """The candidate table, when the evaluation ranks within candidates (evaluation.candidates)."""
    return [CANDIDATES] if config["evaluation"]["candidates"] else []


def store_candidates(config: dict) -> list[str]:
    """The candidate table, when the similarity stores hold only the candidates (similarity.layout)."""
    return [CANDIDATES] if config["similarity"]["layout"] == "candidates" else []


def background(config: dict) -> list[str]:
    """The background data the dataset builds on (synthetic data only)."""
    return ["results/data/background.parquet"] if config["dataset"]["kind"] == "synthetic" else []


def user_data(config: dict, parts: tuple[str, ...] = ("train", "queries")) -> list[str]:
    """The local files of the user's data (kind files; kind huggingface where a path is a local
    file or folder: every file in it), as rule inputs, so editing one reruns what reads it. Hub
    names are not files: the dataset's revision is the hub's business."""
    data = config["dataset"]
    if data["kind"] == "files":
        paths = [data["files"][p] for p in parts]
    elif data["kind"] == "huggingface":
        hf = data["huggingface"]
        paths = ([hf["train"]["path"]] if "train" in parts and hf["train"] else []) + (
            [q["path"] for q in hf["queries"]] if "queries" in parts else []
        )
    else:
        return []
    files: list[str] = []
    for path in dict.fromkeys(p for p in paths if p):
        if os.path.isdir(path):
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
        elif os.path.isfile(path):
            files.append(path)
    return files


def n_shards(config: dict, split: str) -> int:
    """Gradient store shards of a split (queries are one shard)."""
    return config["gradients"]["shards"] if split == "train" else 1


def shard_rows(n: int, shard: int, n_shards: int) -> slice:
    """Contiguous rows of shard `shard` (0-based) out of `n_shards` near-equal shards of n rows."""
    return slice(shard * n // n_shards, (shard + 1) * n // n_shards)


def gradient_shards(config: dict, split: str) -> list[str]:
    return [f"results/gradients/{split}/shard-{i}.h5" for i in range(n_shards(config, split))]


def similarity_parts(config: dict) -> range:
    """Shards of a streamed similarity store."""
    return range(config["similarity"]["shards"])


def projection_methods(config: dict) -> list[str]:
    """Projection methods of the full gradient (select_then_project has its own rule)."""
    return [m for m in config["projection"]["methods"] if m != "select_then_project"]


def selected_projections(config: dict) -> list[str]:
    """Select-then-project stores, one per setting, when that method is requested."""
    if "select_then_project" not in config["projection"]["methods"]:
        return []
    return [f"results/projection/select_then_project/{s}.h5" for s in settings(config)]


def projection_parts(config: dict) -> list[str]:
    """The blocks projection_stream keeps for select-then-project (tdabench.projection_parts),
    when that method is requested."""
    if "select_then_project" not in config["projection"]["methods"]:
        return []
    return ["results/projection/select_then_project/parts.h5"]


def shared_pass(config: dict) -> bool:
    """The similarity stores and the projections from one pass over the model (rule
    similarity_projection_stream): streamed, dense, one shard, projections requested, the same
    gradients for both (similarity.max_component_dim as gradients'), and similarity.share_pass."""
    sim = config["similarity"]
    return (
        sim["share_pass"]
        and bool(config["projection"]["methods"])
        and sim["layout"] == "dense"
        and sim["shards"] == 1
        and sim["max_component_dim"] == config["gradients"]["max_component_dim"]
        and similarity_source(config) == "stream"
    )


def similarity_source(config: dict) -> str:
    """cache | stream: similarity.source, with auto resolved against the estimated gradient cache
    (over the tables' rows when they exist, else the config's estimate)."""
    source = config["similarity"]["source"]
    if source != "auto":
        return source
    n = resources.table_rows("results/data/train.parquet", config) + resources.table_rows(query_table(config), config)
    return "stream" if resources.cache_bytes(config, n) > config["gradients"]["max_cache_gb"] * 1e9 else "cache"


def model_threads(config: dict, local_cores: int | None) -> int:
    """Threads of a model job: resources.threads, else the invocation's --cores (run locally),
    else resources.cluster_threads (a cluster executor has no --cores)."""
    return config["resources"]["threads"] or local_cores or config["resources"]["cluster_threads"]


def requests_gpu(config: dict, rule: str) -> bool:
    """An explicit cuda[:N] device makes every GPU-capable model rule ask the scheduler for GPUs
    (checked on the config, not through tdabench.device: the Snakefile is parsed by every
    invocation and every cluster job, and that module imports torch)."""
    return config["device"].startswith("cuda") and rule in resources.GPU_RULES


def gpus(config: dict) -> int:
    return config["resources"]["gpus"]
