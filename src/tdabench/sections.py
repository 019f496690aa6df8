"""Typed views of the config sections the library consumes (no defaults: the schema holds them).

Torch-free on purpose: the stage contracts (tdabench.contracts) derive the config keys a rule
passes from these fields, and the Snakefile imports the contracts at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyModelConfig:
    """Config section `model.tiny`: the shape of the tiny default Llama."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int


@dataclass(frozen=True)
class BM25Config:
    """Config section `evaluation.bm25`: the BM25 of the baseline and the candidate sets."""

    variant: str  # lucene | okapi (tdabench.data.bm25)
    tokenizer: str  # words | whitespace
    query: str  # prompt (the query's own) | paraphrased_prompt (of the paraphrased query of its source)


@dataclass(frozen=True)
class TokenizeConfig:
    """Config section `tokenize`: how examples become token sequences."""

    max_length: int | None  # None: no truncation
    loss_on: str  # response | all


@dataclass(frozen=True)
class TrainConfig:
    """Config sections `pretrain` / `finetune` (their training keys) plus the study seed."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_fraction: float
    label_smoothing: float
    precision: str  # float32 | bfloat16 (forward under autocast)
    seed: int


@dataclass(frozen=True)
class ExtractionConfig:
    """The `gradients` keys that decide which numbers come out."""

    components: tuple[str, ...]
    batch_size: int
    max_component_dim: int | None
    sketch_seed: int
    autocast: str | None  # None | "bfloat16" | "float16"


@dataclass(frozen=True)
class CostsConfig:
    """The `projection` keys the cost measurement reproduces."""

    methods: tuple[str, ...]
    dims: tuple[int, ...]
    nonzeros: int
    select_kind: str
