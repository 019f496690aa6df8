"""Study configuration: JSON-schema validation with defaults, plus checks across keys.

Light on purpose (no torch): the Snakefile imports it at parse time, so a bad config fails before
any job runs, with a message that names the offending key.

One source of defaults: the schema (tdabench/schemas/config.schema.yaml, shipped with the
package). Stages get typed views of the keys their rule passes (each stage's `Params` in
tdabench.contracts, built by tdabench.contracts.typed, which fills in nothing); the dataclasses
that mirror a section (tdabench.sections) carry no defaults (tests/test_config.py checks).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tdabench.errors import StudyError

DEFAULT_SCHEMA = resources.files("tdabench") / "schemas" / "config.schema.yaml"

# Keys that never change a result: excluded from the config hash.
NON_RESULT_KEYS = ("mlflow", "resources")  # where runs are logged, what jobs ask a scheduler for


class ConfigError(StudyError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


def load_schema(path: str | Path = DEFAULT_SCHEMA) -> dict:
    # A Traversable (the packaged file, possibly inside a zip) or a path.
    return yaml.safe_load(path.read_text() if hasattr(path, "read_text") else Path(path).read_text())


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    if t is None and "enum" in schema:
        return {type(v).__name__ for v in schema["enum"]}
    return set(t) if isinstance(t, list) else {t} if t else set()


def non_finite_keys(instance: Any, where: str = "") -> list[str]:
    """Keys holding inf or NaN (JSON schema's bounds let `.inf` pass `exclusiveMinimum: 0`)."""
    if isinstance(instance, float) and not math.isfinite(instance):
        return [f"{where or '<top level>'} = {instance}"]
    if isinstance(instance, dict):
        return [k for key, v in instance.items() for k in non_finite_keys(v, f"{where}.{key}" if where else key)]
    if isinstance(instance, list):
        return [k for i, v in enumerate(instance) for k in non_finite_keys(v, f"{where}[{i}]")]
    return []


def coerce(instance: Any, schema: dict) -> Any:
    """Values as the schema means them, before validation:
    - a string where the schema wants something else is parsed as YAML: Snakemake hands nested
      `--config` values over as strings (`--config 'projection={dims: [128, 512]}'` gives
      {"dims": ["128", "512"]}), and parsing them gives what the user typed;
    - 2.0 where the schema wants an integer becomes 2 (JSON schema calls it an integer, but Python
      would then count with a float)."""
    types = _types(schema)
    if isinstance(instance, str) and not types & {"string", "str"}:
        try:
            instance = yaml.safe_load(instance)
        except yaml.YAMLError:
            return instance
    if isinstance(instance, float) and "integer" in types and instance.is_integer():
        return int(instance)
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        return {k: coerce(v, props[k]) if k in props else v for k, v in instance.items()}
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [coerce(v, schema["items"]) for v in instance]
    return instance


def fill_defaults(instance: Any, schema: dict) -> Any:
    """Return a copy of `instance` with every missing key that has a schema default filled in."""
    if schema.get("type") != "object" or not isinstance(instance, dict):
        return instance
    out = dict(instance)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = fill_defaults(out[key], sub)
    return out


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else ("." if parts else "") + str(p))
    return "".join(parts) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = _key_path(error)
        keys = ", ".join(f"{where}.{k}" if where != "<top level>" else k for k in extra)
        return f"unknown config key(s) {keys}; allowed here: {', '.join(allowed)}"
    hint = ""
    if error.validator == "type" and isinstance(error.instance, str):
        try:
            float(error.instance)
            hint = (
                f" (YAML 1.1 reads {error.instance} as a string: write it with a decimal point and a signed "
                "exponent, e.g. 5.0e-3, or as 0.005)"
            )
        except ValueError:
            pass
    return f"config key {_key_path(error)}: {error.message}{hint}"


def validate_config(config: dict, schema_path: str | Path = DEFAULT_SCHEMA) -> dict:
    """Validate `config`, fill defaults and check cross-key constraints. Returns a new dict."""
    schema = load_schema(schema_path)
    filled = fill_defaults(coerce(copy.deepcopy(config or {}), schema), schema)
    bad = non_finite_keys(filled)
    if bad:
        raise ConfigError(
            "invalid configuration:\n  " + "\n  ".join(f"config key {k}: not a finite number" for k in bad)
        )
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    check_consistency(filled)
    return filled


def check_consistency(config: dict) -> None:
    """Constraints JSON schema cannot express (they depend on several keys)."""
    from tdabench import resources
    from tdabench.components import match_components

    data, model = config["dataset"], config["model"]
    if data["kind"] == "files" and not (data["files"]["train"] and data["files"]["queries"]):
        raise ConfigError("config key dataset.files: kind files needs dataset.files.train and dataset.files.queries")
    if data["kind"] == "huggingface" and not (data["huggingface"]["train"] and data["huggingface"]["queries"]):
        raise ConfigError(
            "config key dataset.huggingface: kind huggingface needs dataset.huggingface.train "
            "and at least one entry in dataset.huggingface.queries"
        )
    sim = config["similarity"]
    if sim["layout"] == "candidates" and not config["evaluation"]["candidates"]:
        raise ConfigError(
            "config key similarity.layout: candidates ranks each query within its evaluation.candidates "
            "BM25 candidates; set evaluation.candidates (b >= 2) or use layout dense"
        )
    if model["kind"] == "huggingface" and not model["name_or_path"]:
        raise ConfigError("config key model.name_or_path: kind huggingface needs a hub name or a local directory")
    if model["kind"] == "gguf" and not (model["gguf"]["file"] and (model["gguf"]["path"] or model["gguf"]["package"])):
        raise ConfigError("config key model.gguf: kind gguf needs model.gguf.file and model.gguf.path or .package")
    if model["kind"] == "tiny" and config["tokenize"]["max_length"] is None:
        raise ConfigError(
            "config key tokenize.max_length: null (no truncation) needs a model with its own positions "
            "(model.kind huggingface or gguf); the tiny model is built for 2 x max_length positions"
        )
    if model["kind"] == "tiny" and model["tiny"]["hidden_size"] % model["tiny"]["num_heads"]:
        tiny = model["tiny"]
        raise ConfigError(
            f"config key model.tiny.num_heads: {tiny['num_heads']} does not divide "
            f"model.tiny.hidden_size={tiny['hidden_size']}"
        )
    # The gradient's size from the model's config, checkpoint headers or GGUF table (not its
    # weights); a hub name's shapes are known once it is loaded, and the jobs check k then.
    numels = resources.parameter_numels(config)
    if numels is not None:
        try:
            chosen = match_components(list(numels), config["gradients"]["components"])
        except ValueError as e:
            raise ConfigError(f"config key gradients.components: {e}") from None
        cap = config["gradients"]["max_component_dim"]
        dim = sum(min(numels[name], cap or numels[name]) for name in chosen)
        for i, k in enumerate(config["projection"]["dims"]):
            if k > dim:
                raise ConfigError(
                    f"config key projection.dims[{i}]: k={k} is larger than the full gradient "
                    f"dimension {dim} (sum over gradients.components); choose k <= {dim}"
                )
    if model["kind"] != "tiny":
        return
    if data["kind"] != "synthetic":
        return
    syn = data["synthetic"]
    from tdabench.data.synthetic import RELATIONS

    free = syn["n_entities"] * (len(RELATIONS) - syn["background_facts_per_entity"])
    if syn["planted_facts"] > free:
        raise ConfigError(
            f"config key dataset.synthetic.planted_facts: {syn['planted_facts']} > the {free} free "
            "(entity, relation) pairs; add entities or lower background_facts_per_entity"
        )
    n_train = syn["n_entities"] * syn["background_facts_per_entity"] + syn["planted_facts"]
    if config["gradients"]["shards"] > n_train:
        raise ConfigError(
            f"config key gradients.shards: {config['gradients']['shards']} shards for only "
            f"{n_train} training examples; use at most {n_train}"
        )
    n_queries = syn["planted_facts"] * len(data["settings"])
    if sim["source"] != "cache":
        return  # nothing reads a gradient cache: stores and projections stream (auto: when it is too large)
    itemsize = {"float32": 4, "float16": 2}[config["gradients"]["dtype"]]
    gb = (n_train + n_queries) * dim * itemsize / 1e9
    if gb > config["gradients"]["max_cache_gb"]:
        raise ConfigError(
            f"config key gradients.max_cache_gb: the gradient cache would take about {gb:.1f} GB "
            f"({n_train + n_queries} samples x {dim} stored dims); raise the limit, set "
            "gradients.max_component_dim, select fewer gradients.components or use float16"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}, line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                    f"(first at line {seen[key] + 1}); YAML would keep only the last: remove one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def check_unique_keys(path: str | Path) -> None:
    """Refuse a config file with a key twice in one mapping (ConfigError naming the key and lines)."""
    with open(path) as fh:
        try:
            yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
        except yaml.YAMLError:
            pass  # syntax errors: the reader that loads the file names them


def read_config_file(path: str | Path) -> dict:
    """A YAML config file's mapping, unvalidated; ConfigError naming the file (and line) when it is
    missing, not YAML, not a mapping, or gives a key twice."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config keys, got {type(raw).__name__}")
    check_unique_keys(path)
    return raw


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config file, apply `overrides` (deep merge) and validate."""
    raw = read_config_file(path)
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate_config(raw)


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default(path: str) -> Any:
    """The schema's default of a config key, e.g. default("evaluation.recall_at")."""
    node = validate_config({})
    for key in path.split("."):
        node = node[key]
    return node


def config_hash(config: dict) -> str:
    """Short stable hash of every result-relevant config value."""
    relevant = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
