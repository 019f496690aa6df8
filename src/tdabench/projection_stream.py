"""Projections of exact per-sample gradients straight from the model (`similarity.source: stream`):
no gradient cache, and no sample's gradient is ever held whole beside the others.

The samples (training examples, then queries) go through the model batch by batch, as the
gradients stage batches them, and are held in groups as large as `memory_gb` allows (each batch
counted at its own padded length): a linear
layer's gradient as its factors (inputs and output gradients, tokens x (d_in + d_out) a sample)
where that is smaller than the formed d_out x d_in, other components formed. A full group is then
projected one component at a time: the component's gradients are formed ([group, d_c], by the
product the extractor forms them with) and every projection adds its block
(`tdabench.projection.Projector`), all of them from one sweep over the formed gradients
(`project_many`). A Gaussian or Rademacher block is drawn once
per group and component, and drawing is much of a block-wise projection's time at 135M
parameters, so a larger budget means fewer draws; the numbers depend on it only through float32
rounding (a product rounds by how many rows it multiplies, and narrow blocks share products).

Each projection's result is what `project_store` computes from a cache of the same gradients:
the same blocks (drawn from the seed, the component's index and the chunk), applied to the same
rows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tdabench.extraction import Extraction
from tdabench.models import Encoded
from tdabench.numerics import PAD_MULTIPLE
from tdabench.projection import ProjectionConfig, Projector, project_many
from tdabench.representation import Factors, Representation
from tdabench.streaming import check_budget, group_starts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """One projection to compute: its config and the components it projects (all of them: the
    full gradient; a selection: select-then-project)."""

    cfg: ProjectionConfig
    components: tuple[str, ...]
    parts: bool = False  # also hand each component's block to `on_part` (select-then-project sums them)


@dataclass
class ProjectionReport:
    seconds: float = 0.0  # the whole pass
    extract_seconds: float = 0.0  # forward/backward and forming the gradients
    groups: int = 0
    group_rows: int = 0  # the largest group's samples
    factored: list[str] = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)  # per plan: its projection time


@dataclass
class _Projection:
    """A plan's projector, its output [n, out_dim] and where each of its components goes."""

    plan: Plan
    projector: Projector
    out: np.ndarray
    index: dict[str, int]  # component -> the index that seeds its blocks (as in project_store)
    seconds: float = 0.0


def _projection(plan: Plan, names: Sequence[str], dims: dict[str, int], n: int) -> _Projection:
    proj = Projector(plan.cfg, [dims[c] for c in plan.components])
    position = {c: i for i, c in enumerate(names)}  # a component's index among all extracted ones
    # project_store: a full-gradient kind seeds a block by the component's place in the store (so a
    # subset's blocks are the full projection's); a block-wise one by its place in the plan.
    index = {c: position[c] if proj.dims is None else i for i, c in enumerate(plan.components)}
    return _Projection(plan, proj, np.zeros((n, proj.out_dim), dtype=np.float32), index)


class Projections:
    """Every plan's projection of `n` samples ([n, out_dim] float32 each), added a component and a
    range of rows at a time: each projection's block of the component from one sweep over its
    formed gradients (`project_many`). on_part(plan, component, first row, block [rows, k],
    seconds): each block of a plan with `parts` set, as it is added."""

    def __init__(
        self,
        plans: Sequence[Plan],
        names: Sequence[str],
        dims: dict[str, int],
        n: int,
        on_part: Callable[[int, str, int, np.ndarray, float], None] | None = None,
    ):
        self.n = n
        self.items = [_projection(p, names, dims, n) for p in plans]
        self.needed = [c for c in names if any(c in p.components for p in plans)]
        self.on_part = on_part

    def add(self, name: str, first: int, grads: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Rows [first, first + rows) of component `name`: grads [rows, d_c], or row blocks of
        them held apart (stacked in order; each random block is drawn once for all of them)."""
        takers = [p for p in self.items if name in p.index]
        if not takers:
            return
        ys, seconds = project_many(grads, [p.projector.block(p.index[name]) for p in takers])
        rows = ys[0].shape[0]
        for p, y, spent in zip(takers, ys, seconds):
            tick = time.perf_counter()
            p.projector.put(p.out[first : first + rows], p.index[name], y)
            p.seconds += spent + time.perf_counter() - tick
            if p.plan.parts and self.on_part is not None:
                self.on_part(self.items.index(p), name, first, y.numpy(), spent)

    @property
    def outs(self) -> list[np.ndarray]:
        return [p.out for p in self.items]

    @property
    def seconds(self) -> list[float]:
        return [p.seconds for p in self.items]


class InPass:
    """Projections of every sample of a streamed similarity pass (tdabench.streaming: dense layout,
    one unit, training examples read back from disk), from the gradients the pass forms for its
    dot products anyway: no pass over the model of their own. Rows: the training examples, then
    the queries. For each component the pass hands over its training examples (`train`, piece by
    piece), then its queries (`queries`), which projects them together: every random block is
    drawn once for both, as in one group of `project_from_model`."""

    def __init__(self, projections: Projections, extraction: Extraction, n_train: int, n_queries: int):
        self.projections, self.extraction = projections, extraction
        self.n_train, self.n_queries = n_train, n_queries
        self.dims = dict(zip(extraction.names, extraction.stored_dims))
        self.done: set[str] = set()
        self._train: torch.Tensor | None = None  # [T, d_c] of the component being handed over
        self._buffer = torch.empty(0)  # pieces of it formed or copied here
        self._queries = torch.empty(0)  # held queries kept as factors: formed here

    @property
    def complete(self) -> bool:
        """Every needed component projected."""
        return set(self.projections.needed) <= self.done

    def wants(self, name: str) -> bool:
        return name in self.projections.needed

    def train(self, name: str, rows: slice, rep: Representation) -> None:
        """A piece of the training examples' component `name` (rows [a, b) of [0, T)). A formed
        piece holding them all is used where it is (valid until the pass moves on); others are
        formed or copied into one [T, d_c] buffer."""
        if rows == slice(0, self.n_train) and not isinstance(rep, Factors):
            self._train = rep.tensor
            return
        self._train = _formed(self.extraction, name, rep, self._buffer_rows(self.n_train, name), rows)

    def queries(self, name: str, rep: Representation) -> None:
        """The queries' component `name` [Q, ...]: projected with the training examples."""
        if not isinstance(rep, Factors):
            q = rep.tensor
        else:
            need = self.n_queries * self.dims[name]
            if self._queries.numel() < need:
                self._queries = torch.empty(0)
                self._queries = torch.empty(need)
            q = self._queries[:need].view(self.n_queries, self.dims[name])
            self.extraction.extractor().form(name, rep, out=q)
        if self._train is None or self._train.shape[0] != self.n_train or q.shape[0] != self.n_queries:
            raise RuntimeError(
                f"component {name}: the pass handed over other rows than its training examples and queries"
            )
        self.projections.add(name, 0, [self._train, q])
        self._train = None
        self.done.add(name)

    def _buffer_rows(self, n: int, name: str) -> torch.Tensor:
        need = n * self.dims[name]
        if self._buffer.numel() < need:
            self._buffer = torch.empty(0)  # (freed before the larger one is made)
            self._buffer = torch.empty(need)
        return self._buffer[:need].view(n, self.dims[name])


def _formed(extraction: Extraction, name: str, rep: Representation, out: torch.Tensor, rows: slice) -> torch.Tensor:
    """`rep` (rows `rows` of `out`) formed into its rows by the extractor's product -> out."""
    if isinstance(rep, Factors):
        extraction.extractor().form(name, rep, out=out[rows])
    else:
        out[rows] = rep.tensor
    return out


def padded_tokens(examples: Sequence[Encoded]) -> int:
    """The longest example's tokens, padded as a batch pads them (an upper bound for any batch)."""
    longest = max((len(e.input_ids) for e in examples), default=1)
    return math.ceil(longest / PAD_MULTIPLE) * PAD_MULTIPLE


def held_factored(extraction: Extraction, names: Sequence[str], tokens: int) -> list[str]:
    """Those of `names` held as factors: factorable, and smaller so at `tokens` tokens."""
    shapes = {c.name: c.shape for c in extraction.components}
    sketched = extraction.sketch_info
    return [
        n for n in extraction.factorable(names) if n not in sketched and tokens * sum(shapes[n]) < math.prod(shapes[n])
    ]


def sample_bytes(extraction: Extraction, names: Sequence[str], factored: Sequence[str], tokens: int) -> float:
    """float32 bytes one sample holds: factors or formed gradient per component."""
    shapes = {c.name: c.shape for c in extraction.components}
    dims = dict(zip(extraction.names, extraction.stored_dims))
    return 4.0 * sum(tokens * sum(shapes[n]) if n in factored else dims[n] for n in names)


def project_from_model(
    extraction: Extraction,
    pad_id: int,
    parts: Sequence[Sequence[Encoded]],
    plans: Sequence[Plan],
    memory_gb: float,
    progress=None,
    on_part: Callable[[int, str, int, np.ndarray, float], None] | None = None,
) -> tuple[list[np.ndarray], ProjectionReport]:
    """Every plan's projection of the samples of `parts` (e.g. training examples, queries), rows in
    order, each part batched on its own -> ([n, out_dim] float32 per plan, report).

    progress: advanced by each sample twice, as it goes through the model and as its group is
    projected (component by component): 2 n steps in all. on_part(plan, component, first row,
    block [rows, k], seconds): each block of a plan with `parts` set, as it is added."""
    start = time.perf_counter()
    names = extraction.names
    needed = [n for n in names if any(n in p.components for p in plans)]
    dims = dict(zip(names, extraction.stored_dims))
    n_samples = sum(len(p) for p in parts)
    tokens = padded_tokens([e for p in parts for e in p])
    factored = held_factored(extraction, needed, tokens)
    widest = max(dims[n] for n in needed)

    def held_bytes(length: int) -> float:
        # a sample of a batch padded to `length` tokens: its gradients as held, plus its row of
        # the reused [group, widest] buffer each component is formed in
        return sample_bytes(extraction, needed, factored, length) + 4.0 * widest

    check_budget(memory_gb, held_bytes(tokens), "one sample's gradient, held and formed")
    starts = group_starts(
        [
            b["input_ids"].shape[0] * held_bytes(b["input_ids"].shape[1])
            for p in parts
            for _, b in extraction.batches(p, pad_id)
        ],
        memory_gb * 1e9,
    )
    projections = Projections(plans, names, dims, n_samples, on_part)
    report = ProjectionReport(factored=factored)
    extractor = extraction.extractor(needed)
    formed_buf = torch.empty(0)  # sized by the largest group (fresh memory from the OS on every
    # call would cost page faults on every component of every group)

    held: list[tuple[int, dict[str, Representation]]] = []  # (first row, a batch's gradients)

    def flush() -> None:
        nonlocal formed_buf
        first, rows = held[0][0], row - held[0][0]
        if formed_buf.numel() < rows * widest:
            formed_buf = torch.empty(0)  # (freed before the larger one is made)
            formed_buf = torch.empty(rows * widest)
        for i, name in enumerate(needed):
            tick = time.perf_counter()
            grads = formed_buf[: rows * dims[name]].view(rows, dims[name])  # [group, d_c] formed
            at = 0
            for _, reps in held:
                rep = reps.pop(name)  # (its memory goes once formed)
                size = rep.rows
                if isinstance(rep, Factors):
                    extractor.form(name, rep, out=grads[at : at + size])
                else:
                    grads[at : at + size] = rep.tensor
                at += size
            report.extract_seconds += time.perf_counter() - tick
            projections.add(name, first, grads)
            if progress is not None:  # this component's share of the group's rows
                progress.update(rows * (i + 1) // len(needed) - rows * i // len(needed))
        held.clear()
        report.groups += 1
        report.group_rows = max(report.group_rows, rows)

    row, number = 0, 0  # rows and batches so far
    for examples in parts:
        for _, batch in extraction.batches(examples, pad_id):
            size = batch["input_ids"].shape[0]
            if held and number in starts:
                flush()
            number += 1
            tick = time.perf_counter()
            reps = extraction.represent(batch, needed, factored=factored)
            report.extract_seconds += time.perf_counter() - tick
            held.append((row, reps))
            row += size
            if progress is not None:
                progress.update(size)
    if held:
        flush()
    report.seconds = time.perf_counter() - start
    report.plan_seconds = projections.seconds
    return projections.outs, report
