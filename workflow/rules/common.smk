# Shared helpers: code dependencies of each stage, and the file lists rules expand.

from tdabench.codedeps import stage_sources


def stage_code(stage):
    """Library files the stage's job runs (module + transitive tdabench imports), relative to the
    working directory so that moving the checkout together with its results reruns nothing."""
    return [os.path.relpath(p) for p in stage_sources(f"tdabench.pipeline.{stage}", SRC / "tdabench")]


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
    setting=r"[a-z_]+",
    method=r"[a-z_]+",
