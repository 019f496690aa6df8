"""Each stage's contract, declared once: the rule, its entry point and its typed `Params`, whose
fields say which config keys they come from.

Everything else derives from here: a rule's `params:` (`rule_params`, so a change to exactly these
keys reruns the rule), its `code` input (the entry module's sources, tdabench.codedeps), the
stage's typed view of its params (`typed`), and the packaging test. A field comes from
- `key("a.b")`: one config value;
- `section("a", x="c.d")`: a section as the field's dataclass, its keys named by the dataclass'
  fields (a field renamed to another key where the rule reads it elsewhere);
- `subset("a", "k1", "k2")`: only the named keys of a section, as a mapping;
- `study()`: the whole result-bearing config (the summary writes it out);
- `given()`: what only the rule knows (an input path, a wildcard's shard count).

Torch-free: the Snakefile imports it at parse time.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tdabench.config import NON_RESULT_KEYS
from tdabench.sections import BM25Config, CostsConfig, ExtractionConfig, TinyModelConfig, TokenizeConfig, TrainConfig

T = TypeVar("T")
_FROM = "tdabench.source"  # field metadata: where the value comes from
_GIVEN, _STUDY = "<given by the rule>", "<the study config>"


def key(path: str) -> Any:
    return field(metadata={_FROM: path})


def section(path: str, **renamed: str) -> Any:
    return field(metadata={_FROM: path, "renamed": renamed})


def subset(path: str, *names: str) -> Any:
    return field(metadata={_FROM: path, "names": names})


def study() -> Any:
    return field(metadata={_FROM: _STUDY})


def given() -> Any:
    return field(metadata={_FROM: _GIVEN})


# ---- Params of each stage -------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetParams:
    kind: str = key("dataset.kind")
    synthetic: dict = key("dataset.synthetic")
    files: dict = key("dataset.files")
    huggingface: dict = key("dataset.huggingface")
    seed: int = key("seed")


@dataclass(frozen=True)
class BackgroundParams(DatasetParams):
    # only the keys that shape the background: planted settings never rerun pretraining
    synthetic: dict = subset("dataset.synthetic", "n_entities", "background_facts_per_entity", "train_templates")


@dataclass(frozen=True)
class PretrainParams:
    kind: str = key("dataset.kind")
    model: TinyModelConfig = section("model.tiny")
    tokenize: TokenizeConfig = section("tokenize")
    train: TrainConfig = section("pretrain", seed="seed")
    seed: int = key("seed")
    device: str = key("device")


@dataclass(frozen=True)
class ConvertParams:
    gguf: dict = key("model.gguf")  # path, package, file


@dataclass(frozen=True)
class FinetuneParams:
    base: str = given()  # the base model: a produced or local directory, or a hub name
    tokenize: TokenizeConfig = section("tokenize")
    train: TrainConfig = section("finetune", seed="seed")
    eval_batch_size: int = key("finetune.eval_batch_size")
    device: str = key("device")


@dataclass(frozen=True)
class GenerateParams:
    model: str = given()  # the attributed model: a produced or local directory, or a hub name
    max_length: int | None = key("tokenize.max_length")
    max_new_tokens: int = key("dataset.generate_max_tokens")
    batch_size: int = key("finetune.eval_batch_size")
    device: str = key("device")


@dataclass(frozen=True)
class GradientsParams:
    model: str = given()
    shards: int = given()  # shards of this split (gradients.shards for train, 1 for queries)
    extraction: ExtractionConfig = section("gradients")
    dtype: str = key("gradients.dtype")  # storage
    max_cache_gb: float = key("gradients.max_cache_gb")
    verify: int = key("gradients.verify")
    verify_tolerance: float | None = key("gradients.verify_tolerance")
    tokenize: TokenizeConfig = section("tokenize")
    device: str = key("device")


@dataclass(frozen=True)
class CandidatesParams:
    settings: tuple[str, ...] = key("dataset.settings")
    b: int = key("evaluation.candidates")
    bm25: BM25Config = section("evaluation.bm25")


@dataclass(frozen=True)
class SimilarityParams:
    block_rows: int = key("similarity.block_rows")
    dtype: str = key("similarity.dtype")
    layout: str = key("similarity.layout")  # candidates: the sets of results/data/bm25_candidates.parquet


@dataclass(frozen=True)
class StreamParams:
    model: str = given()
    settings: tuple[str, ...] = key("dataset.settings")  # one pass writes every setting's part
    # gradients' keys, capped by similarity's own max_component_dim (null: exact), so the cache
    # may be sketched while the streamed store is exact
    extraction: ExtractionConfig = section("gradients", max_component_dim="similarity.max_component_dim")
    dtype: str = key("similarity.dtype")
    layout: str = key("similarity.layout")
    memory_gb: float = key("similarity.memory_gb")
    shards: int = key("similarity.shards")
    verify: int = key("gradients.verify")
    verify_tolerance: float | None = key("gradients.verify_tolerance")
    tokenize: TokenizeConfig = section("tokenize")
    device: str = key("device")


@dataclass(frozen=True)
class SharedStreamParams(StreamParams):
    """The similarity stores and every projection from one pass (tdabench.pipeline.shared_stream)."""

    methods: tuple[str, ...] = key("projection.methods")
    dims: tuple[int, ...] = key("projection.dims")
    seeds: tuple[int, ...] = key("projection.seeds")
    nonzeros: int = key("projection.nonzeros")
    select_kind: str = key("projection.select_kind")


@dataclass(frozen=True)
class MergeParams:
    dtype: str = key("similarity.dtype")


@dataclass(frozen=True)
class SelectionParams:
    selection_fraction: float = key("selection.selection_fraction")
    n_splits: int = key("selection.n_splits")
    split_seed: int = key("selection.split_seed")
    objective: str = key("selection.objective")
    budgets: tuple[float, ...] = key("selection.budgets")


@dataclass(frozen=True)
class ProjectionParams:
    dims: tuple[int, ...] = key("projection.dims")
    seeds: tuple[int, ...] = key("projection.seeds")
    nonzeros: int = key("projection.nonzeros")


@dataclass(frozen=True)
class SelectedProjectionParams(ProjectionParams):
    select_kind: str = key("projection.select_kind")


@dataclass(frozen=True)
class ModelProjectionParams(ProjectionParams):
    """Projections straight from the model (similarity.source stream): the gradients' keys as
    configured (a count-sketched component is projected as the cache would hold it)."""

    model: str = given()
    extraction: ExtractionConfig = section("gradients")
    memory_gb: float = key("similarity.memory_gb")  # the stream's budget: gradients held at once
    verify: int = key("gradients.verify")
    verify_tolerance: float | None = key("gradients.verify_tolerance")
    tokenize: TokenizeConfig = section("tokenize")
    device: str = key("device")


@dataclass(frozen=True)
class StreamProjectionParams(ModelProjectionParams):
    methods: tuple[str, ...] = key("projection.methods")  # one pass projects every full-gradient one
    select_kind: str = key("projection.select_kind")  # ... and keeps this kind's blocks for select-then-project


@dataclass(frozen=True)
class SelectedStreamParams(ProjectionParams):
    """Select-then-project summed from the blocks projection_stream kept (tdabench.projection_parts)."""

    settings: tuple[str, ...] = key("dataset.settings")
    select_kind: str = key("projection.select_kind")


@dataclass(frozen=True)
class CostsParams:
    model: str = given()
    settings: tuple[str, ...] = key("dataset.settings")
    cost_samples: int = key("evaluation.cost_samples")
    costs: CostsConfig = section("projection")
    extraction: ExtractionConfig = section("gradients")
    tokenize: TokenizeConfig = section("tokenize")
    device: str = key("device")


@dataclass(frozen=True)
class EvaluateParams:
    settings: tuple[str, ...] = key("dataset.settings")
    recall_at: tuple[int, ...] = key("evaluation.recall_at")
    candidates: int | None = key("evaluation.candidates")
    bm25: BM25Config = section("evaluation.bm25")  # the bm25 baseline's
    bootstrap: int = key("evaluation.bootstrap")
    bootstrap_seed: int = key("evaluation.bootstrap_seed")
    # the same splits the selection stage used
    selection_fraction: float = key("selection.selection_fraction")
    n_splits: int = key("selection.n_splits")
    split_seed: int = key("selection.split_seed")


@dataclass(frozen=True)
class SummaryParams:
    settings: tuple[str, ...] = key("dataset.settings")
    study_config: dict = study()  # written to results/config.yaml


# ---- The contracts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    rule: str
    entry: str  # "module:function" of the stage (workflow/scripts/stage.py runs it)
    params: type

    @property
    def module(self) -> str:
        """The pipeline module the rule runs (its code dependencies start there)."""
        return self.entry.partition(":")[0]


CONTRACTS: dict[str, Contract] = {
    c.rule: c
    for c in (
        Contract("background", "tdabench.pipeline.dataset:main_background", BackgroundParams),
        Contract("dataset", "tdabench.pipeline.dataset:main", DatasetParams),
        Contract("pretrain", "tdabench.pipeline.pretrain:main", PretrainParams),
        Contract("convert", "tdabench.pipeline.convert:main", ConvertParams),
        Contract("finetune", "tdabench.pipeline.finetune:main", FinetuneParams),
        Contract("generate", "tdabench.pipeline.generate:main", GenerateParams),
        Contract("gradients", "tdabench.pipeline.gradients:main", GradientsParams),
        Contract("bm25_candidates", "tdabench.pipeline.candidates:main", CandidatesParams),
        Contract("similarity", "tdabench.pipeline.similarity:main", SimilarityParams),
        Contract("similarity_stream", "tdabench.pipeline.similarity:main_stream", StreamParams),
        Contract("similarity_projection_stream", "tdabench.pipeline.shared_stream:main", SharedStreamParams),
        Contract("similarity_merge", "tdabench.pipeline.similarity:main_merge", MergeParams),
        Contract("selection", "tdabench.pipeline.selection:main", SelectionParams),
        Contract("projection", "tdabench.pipeline.projection:main", ProjectionParams),
        Contract("project_selected", "tdabench.pipeline.projection:main_selected", SelectedProjectionParams),
        Contract("projection_stream", "tdabench.pipeline.projection_stream:main_stream", StreamProjectionParams),
        Contract(
            "project_selected_stream", "tdabench.pipeline.projection_stream:main_selected_stream", SelectedStreamParams
        ),
        Contract("costs", "tdabench.pipeline.costs:main", CostsParams),
        Contract("evaluate", "tdabench.pipeline.evaluate:main", EvaluateParams),
        Contract("summary", "tdabench.pipeline.summary:main", SummaryParams),
    )
}


class ContractError(ValueError):
    """A rule or a job does not match its stage's contract (a workflow/library mismatch)."""


def lookup(config: dict, path: str) -> Any:
    """config["a"]["b"] for path "a.b"."""
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def sources(cls: type) -> dict[str, str]:
    """Field name -> where its value comes from (a config path, or one of the markers)."""
    return {f.name: f.metadata[_FROM] for f in dataclasses.fields(cls)}


def config_keys(cls: type) -> set[str]:
    """Every config key (dotted path) the Params class `cls` reads."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        path = f.metadata[_FROM]
        if path == _GIVEN:
            continue
        if path == _STUDY:
            out.add("*")
        elif "renamed" in f.metadata:
            renamed = f.metadata["renamed"]
            out |= {renamed.get(g.name, f"{path}.{g.name}") for g in dataclasses.fields(hints[f.name])}
        elif "names" in f.metadata:
            out |= {f"{path}.{n}" for n in f.metadata["names"]}
        else:
            out.add(path)
    return out


def _value(f: dataclasses.Field, hint: Any, config: dict) -> Any:
    path = f.metadata[_FROM]
    if path == _STUDY:
        return {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    if "renamed" in f.metadata:
        renamed = f.metadata["renamed"]
        return {g.name: lookup(config, renamed.get(g.name, f"{path}.{g.name}")) for g in dataclasses.fields(hint)}
    if "names" in f.metadata:
        return {n: lookup(config, f"{path}.{n}") for n in f.metadata["names"]}
    return lookup(config, path)


def rule_params(rule: str, config: dict, **given_values: Any) -> dict[str, Any]:
    """A rule's `params:`: the numerics mode (the job runner's), the config values its contract
    names, and the values only the rule knows (`given_values`, which must be exactly its
    contract's given() fields)."""
    cls = CONTRACTS[rule].params
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    wanted = {f.name for f in fields if f.metadata[_FROM] == _GIVEN}
    if set(given_values) != wanted:  # a rule out of step with its contract
        raise ContractError(f"rule {rule}: given values {sorted(wanted)} wanted, got {sorted(given_values)}")
    values = {f.name: given_values[f.name] if f.name in wanted else _value(f, hints[f.name], config) for f in fields}
    return {"numerics": config["numerics"], **values}


def typed(cls: type[T], data: dict, where: str = "params") -> T:
    """`data` as the dataclass `cls`: every field required, no unknown keys; nested dataclasses
    are built recursively, lists become tuples where a field says tuple. Defaults live in the
    config schema only, so nothing here fills one in."""
    if not isinstance(data, dict):
        raise ContractError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in data]
    unknown = sorted(set(data) - set(names))
    if missing or unknown:
        raise ContractError(f"{where}: {cls.__name__} needs {names}; missing {missing}, unknown {unknown}")
    return cls(**{n: _convert(hints[n], data[n], f"{where}.{n}") for n in names})


def _convert(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return typed(hint, value, where)
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value
