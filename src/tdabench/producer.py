"""What every producer of a similarity store offers: one call that writes a store in the one format
(tdabench.similarity), whatever computes its numbers.

A `Target` says which store (its queries, training examples, ground truth, candidates, attributes,
storage dtype); a `SimilarityProducer` adds the component columns it knows and the numbers it
computes, through a `SimilarityWriter`. Two exist: `tdabench.cached.CacheProducer` (from stored
gradients) and `tdabench.streaming.StreamProducer` (straight from the model). A new one (random
projections, say) subclasses `SimilarityProducer`; every reader of the store works unchanged.
`write_all` writes several targets; the stream writes them in one pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tdabench.similarity import Header


def ground_truth(train_ids: Sequence[str], source_ids: Sequence[str]) -> np.ndarray:
    """[Q] index into `train_ids` of each query's source example (KeyError naming unknown ids)."""
    index = {s: i for i, s in enumerate(train_ids)}
    unknown = sorted({s for s in source_ids if s not in index})
    if unknown:
        raise KeyError(f"source ids not among the training examples: {unknown[:5]}")
    return np.array([index[s] for s in source_ids], dtype=np.int64)


@dataclass(frozen=True)
class Target:
    """Which similarity store to write, independent of how its numbers are computed."""

    query_ids: Sequence[str]
    train_ids: Sequence[str]
    ground_truth: np.ndarray  # [Q] index into train_ids of each query's source example
    candidates: np.ndarray | None = None  # [Q, b] indices into train_ids; None: dense layout
    attrs: dict = field(default_factory=dict)  # setting, model_fingerprint, shard, ...
    dtype: str = "float64"  # storage dtype of dot products and squared norms

    @property
    def layout(self) -> str:
        return "dense" if self.candidates is None else "candidates"

    def header(self, source: str, **components) -> Header:
        """The store's header: these rows and columns, the producer's `components` columns
        (components, component_params, component_family, ... as `Header` names them)."""
        return Header(
            **components,
            query_ids=list(self.query_ids),
            train_ids=list(self.train_ids),
            ground_truth=np.asarray(self.ground_truth, dtype=np.int64),
            candidates=None if self.candidates is None else np.asarray(self.candidates, dtype=np.int64),
            attrs={"source": source, "layout": self.layout, **self.attrs},
        )


@dataclass(kw_only=True)
class Report:
    """What a producer did."""

    n_units: int  # units of work in the store's writer
    units_resumed: int = 0  # already done in a partial file
    seconds: float = 0.0


class SimilarityProducer(ABC):
    """Computes per-component dot products and squared norms one way."""

    source: str  # the store's attrs["source"]

    @abstractmethod
    def write(self, out: str | Path, target: Target, progress=None) -> Report:
        """Write the store `target` to `out` (sealed; resumable where the producer allows).
        progress: optional, with `update(n)` (and `set_total(n)`)."""

    def write_all(self, outs: Sequence[str | Path], targets: Sequence[Target], progress=None) -> Report:
        """Several stores (a study's settings), each to its own file; a producer that can share
        work between them (the stream's pass over the training examples) overrides this."""
        reports = [self.write(o, t, progress) for o, t in zip(outs, targets, strict=True)]
        return Report(
            n_units=sum(r.n_units for r in reports),
            units_resumed=sum(r.units_resumed for r in reports),
            seconds=sum(r.seconds for r in reports),
        )
