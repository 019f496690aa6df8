"""The similarity store streamed straight from the model: exact per-component dot products and
squared norms with no gradient cache, at any model size (`similarity.source: stream`).

Layouts (tdabench.similarity):
* dense — every query against every training example of this job's shard. Queries are taken in
  chunks whose representations fit `memory_gb`; the shard's training examples stream past each
  chunk once, so a chunk costs one pass over the shard (larger chunks: fewer passes).
* candidates — each query against its candidates only. A unit is a few queries plus the union of
  their candidates in this shard (about one batch, within `memory_gb`), computed in one batched
  pass (a shared candidate once).

Each component is represented one of two ways (tdabench.representation), chosen once per job by
`plan_ways` from the multiply-adds of tdabench.factored: materialised (`Dense`: its per-sample
gradient, or count sketch) or factored (`Factors`: a linear layer's inputs and output gradients,
never forming the d_out x d_in gradient). Dot products accumulate in float64 either way.

`StreamProducer` is this module's `SimilarityProducer` (tdabench.producer); `Streamer` is the
engine it runs.

Resume and shards: units go through `SimilarityWriter` (a partial file with a done mask), so a
killed job resumes where it stopped. A shard job fills only the pairs whose training example lies
in its rows and leaves the rest 0, so `merge_similarity` sums shards exactly; query squared norms
are written by shard 0 only.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tdabench.config import ConfigError
from tdabench.extraction import Extraction
from tdabench.factored import FACTORED, MATERIALISED, choose
from tdabench.gradients import iter_batches
from tdabench.models import Encoded, collate
from tdabench.plan import shard_rows
from tdabench.producer import Report, SimilarityProducer, Target
from tdabench.representation import Collector, Representation, concat
from tdabench.similarity import Header, SimilarityWriter

log = logging.getLogger(__name__)
LAYOUTS = ("dense", "candidates")


@dataclass(frozen=True)
class StreamSpec:
    layout: str  # dense | candidates
    memory_gb: float  # representations held at once: a dense chunk of queries, a candidate unit
    shard: int = 0  # this job's training shard (0-based) ...
    shards: int = 1  # ... of this many near-equal contiguous shards


@dataclass(kw_only=True)
class StreamReport(Report):
    ways: dict[str, str]  # component -> materialised | factored
    tokens: float  # mean tokens per sample, as the choice of ways assumed
    pairs_per_sample: float
    samples_computed: int = 0  # forward/backward passes of one sample, summed
    chunk_queries: int | None = None  # dense: queries held per chunk
    extra: dict = field(default_factory=dict)


# --- planning ----------------------------------------------------------------------------------


def plan_ways(extraction: Extraction, tokens: float, pairs_per_sample: float) -> dict[str, str]:
    """Per component: factored where it is possible (a stock Linear/Conv1D weight, unsketched) and
    `tdabench.factored.choose` finds it cheaper, else materialised."""
    can = set(extraction.factorable())
    ways = {}
    for c in extraction.components:
        if c.name in can:
            d_a, d_b = c.shape  # [d_out, d_in] (Conv1D: [d_in, d_out]); the rule is symmetric
            ways[c.name] = choose(round(tokens), d_b, d_a, pairs_per_sample)
        else:
            ways[c.name] = MATERIALISED
    return ways


def bytes_per_sample(extraction: Extraction, ways: dict[str, str], tokens: float) -> float:
    """float32 bytes one sample's representation holds."""
    dims = dict(zip(extraction.names, extraction.stored_dims))
    total = 0.0
    for c in extraction.components:
        total += tokens * sum(c.shape) if ways[c.name] == FACTORED else dims[c.name]
    return 4 * total


def check_budget(memory_gb: float, need: float, what: str) -> None:
    """Refuse a budget that holds less than the smallest unit a pass must hold (`need` bytes),
    naming the config key and the smallest value that works (rounded up to 3 digits)."""
    if memory_gb * 1e9 >= need:
        return
    gb = need / 1e9
    step = 10 ** (math.floor(math.log10(gb)) - 2)
    smallest = math.ceil(gb * (1 + 1e-9) / step) * step
    raise ConfigError(
        f"config key similarity.memory_gb: {memory_gb:g} GB cannot hold {what} ({gb:.3g} GB); "
        f"the smallest value that works is {smallest:.3g}"
    )


def component_columns(extraction: Extraction, ways: dict[str, str]) -> dict[str, list]:
    """The store's per-component columns (`Header` names) of what `extraction` streams `ways`."""
    comps = extraction.components
    return dict(
        components=[c.name for c in comps],
        component_params=[c.numel for c in comps],
        component_family=[c.family for c in comps],
        component_layer=[-1 if c.layer is None else c.layer for c in comps],
        component_dim=list(extraction.stored_dims),
        component_method=["countsketch" if c.name in extraction.sketch_info else "exact" for c in comps],
        component_way=[ways[c.name] for c in comps],
    )


def header(
    extraction: Extraction,
    ways: dict[str, str],
    query_ids: Sequence[str],
    train_ids: Sequence[str],
    ground_truth: np.ndarray,
    candidates: np.ndarray | None,
    attrs: dict,
) -> Header:
    """The header of a streamed store (for `Streamer.run`)."""
    target = Target(query_ids, train_ids, ground_truth, candidates, attrs)
    return target.header("stream", **component_columns(extraction, ways))


# --- the streamed store -----------------------------------------------------------------------


class Streamer:
    """Writes one (shard of a) similarity store from the model, unit by unit, resumably."""

    def __init__(self, extraction: Extraction, pad_id: int, spec: StreamSpec):
        if spec.layout not in LAYOUTS:
            raise ValueError(f"similarity.layout must be one of {LAYOUTS}, not {spec.layout!r}")
        if not 0 <= spec.shard < spec.shards:
            raise ValueError(f"shard {spec.shard} is not among 0..{spec.shards - 1}")
        self.extraction, self.pad_id, self.spec = extraction, pad_id, spec
        self.names = extraction.names
        self.factored: list[str] = []
        # Representations and dot products stay where the model is (a GPU's memory, then), only
        # the dot products come back to the host.
        self.device = extraction.device
        self.on_device = self.device.type != "cpu"

    def represent(
        self, examples: Sequence[Encoded], reuse: bool = False
    ) -> Iterator[tuple[slice, dict[str, Representation]]]:
        """(rows, {component: representation}) per padded batch of `examples`. reuse: materialised
        gradients go into buffers reused batch after batch (valid until the next batch)."""
        buffers = {}
        if reuse and not self.on_device:
            formed = [n for n in self.names if n not in self.factored]
            buffers = self.extraction.buffers(self.extraction.cfg.batch_size, formed)
        for rows, batch in self.extraction.batches(examples, self.pad_id):
            size = rows.stop - rows.start
            out = {n: b[:size] for n, b in buffers.items()}
            yield rows, self.extraction.represent(batch, out=out, factored=self.factored, on_device=self.on_device)

    def run(
        self,
        queries: Sequence[Encoded],
        train: Sequence[Encoded],
        out: str | Path,
        make_header,
        candidates: np.ndarray | None = None,
        progress=None,
        query_rows: np.ndarray | None = None,
        dtype: str = "float64",
    ) -> StreamReport:
        """Stream the store of `queries` x `train` (or their `candidates` [Q, b]) into `out`.

        make_header(ways) -> Header (the components' ways are only known once planned here).
        query_rows: the store's queries as increasing rows of `queries` (default: all); the dense
        layout batches the whole of `queries` as a gradients job does and keeps these rows.
        dtype: storage dtype of the store.
        """
        query_rows = np.arange(len(queries)) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
        if len(query_rows) and (np.diff(query_rows) <= 0).any():
            raise ValueError("query_rows must be increasing")
        if (candidates is None) != (self.spec.layout == "dense"):
            raise ValueError(f"layout {self.spec.layout!r} with candidates={'none' if candidates is None else 'given'}")
        start = time.perf_counter()
        t_rows = shard_rows(len(train), self.spec.shard, self.spec.shards)
        if t_rows.stop == t_rows.start:
            raise ValueError(
                f"config key similarity.shards: shard {self.spec.shard} of {self.spec.shards} holds no training "
                f"example ({len(train)} in all); use at most {len(train)} shards"
            )
        lengths = [len(queries[r].input_ids) for r in query_rows] + [len(e.input_ids) for e in train[t_rows]]
        tokens = float(np.mean(lengths)) if lengths else 1.0
        if candidates is None:
            report = self._dense(queries, query_rows, train, t_rows, tokens, out, make_header, progress, dtype)
        else:
            chosen = [queries[r] for r in query_rows]
            report = self._candidates(chosen, train, t_rows, candidates, tokens, out, make_header, progress, dtype)
        report.seconds = time.perf_counter() - start
        return report

    def _plan(self, tokens: float, pairs_per_sample: float) -> dict[str, str]:
        ways = plan_ways(self.extraction, tokens, pairs_per_sample)
        self.factored = [n for n, w in ways.items() if w == FACTORED]
        return ways

    def _dense(self, queries, query_rows, train, t_rows, tokens, out, make_header, progress, dtype) -> StreamReport:
        n_t, bs = t_rows.stop - t_rows.start, self.extraction.cfg.batch_size
        # Query batches as a gradients job batches the whole query table (so the per-sample
        # gradients, and the store, agree with the cached path's); those holding none are skipped.
        batches = [
            (rows, query_rows[(query_rows >= rows.start) & (query_rows < rows.stop)])
            for rows in iter_batches(len(queries), bs)
        ]
        batches = [(rows, mine) for rows, mine in batches if len(mine)]
        position = {int(r): i for i, r in enumerate(query_rows)}  # table row -> store query index
        # Whole batches per chunk, as many as the budget holds (at least one); the size is that of
        # materialised representations (an upper bound), the ways then follow from the pairs.
        per_query = bytes_per_sample(self.extraction, dict.fromkeys(self.names, MATERIALISED), tokens)
        largest = max(len(mine) for _, mine in batches)
        check_budget(self.spec.memory_gb, per_query * largest, f"one batch of query gradients ({largest} queries)")
        per_chunk = max(1, int(self.spec.memory_gb * 1e9 // (per_query * bs)))
        chunks = [batches[i : i + per_chunk] for i in range(0, len(batches), per_chunk)]
        chunk = min(per_chunk * bs, len(query_rows))
        pps = (chunk * n_t + chunk + n_t) / (chunk + n_t)  # cross pairs plus every sample's norm
        ways = self._plan(tokens, pps)
        report = StreamReport(ways=ways, tokens=tokens, pairs_per_sample=pps, n_units=len(chunks), chunk_queries=chunk)
        _start(progress, len(chunks))
        with SimilarityWriter(out, make_header(ways), len(chunks), dtype) as writer:
            done = writer.done
            report.units_resumed = int(done.sum())
            for u, part in enumerate(chunks):
                if done[u]:
                    _tick(progress)
                    continue
                q0 = position[int(part[0][1][0])]
                q1 = position[int(part[-1][1][-1])] + 1  # the chunk's queries: store rows [q0, q1)
                held = self._hold(queries, part, position, q0, q1)  # {component: [chunk, ...]}
                report.samples_computed += sum(rows.stop - rows.start for rows, _ in part) + n_t
                q_sq = np.stack([held[n].self_dots().cpu().numpy() for n in self.names])  # [C, chunk]
                t_sq, dot = self._pass(held, train[t_rows])
                del held  # before the next chunk is held: one chunk at a time
                writer.write(
                    u,
                    slice(q0, q1),
                    dot,
                    columns=t_rows,
                    query_sqnorm=q_sq if self.spec.shard == 0 else None,
                    train_rows=t_rows,
                    train_sqnorm=t_sq,
                )
                _tick(progress)
        return report

    def _pass(self, held: dict[str, Representation], train: Sequence[Encoded]) -> tuple[np.ndarray, np.ndarray]:
        """One pass of `train` against a held chunk -> (train_sqnorm [C, T], dot [C, chunk, T])."""
        n_q = held[self.names[0]].rows
        t_sq = np.zeros((len(self.names), len(train)))
        dot = np.zeros((len(self.names), n_q, len(train)))
        for rows, reps in self.represent(train, reuse=True):
            for ci, n in enumerate(self.names):
                t = reps[n].double()  # converted once, used for norms and every query
                t_sq[ci, rows] = t.self_dots().cpu().numpy()
                dot[ci, :, rows] = held[n].gram(t).cpu().numpy()
        return t_sq, dot

    def _hold(self, queries, part, position, q0: int, q1: int) -> dict[str, Representation]:
        """A chunk's query representations, one per component, rows in store order [q0, q1):
        whole table batches computed, the setting's rows kept."""
        held: dict[str, Collector] = {}
        for rows, mine in part:
            batch = collate(list(queries[rows]), self.pad_id)
            reps = self.extraction.represent(batch, factored=self.factored, on_device=self.on_device)
            local = torch.as_tensor(mine - rows.start, device=self.device)
            at = [position[int(r)] - q0 for r in mine]  # consecutive
            for n, r in reps.items():
                held.setdefault(n, r.collector(q1 - q0)).add(r, local, slice(at[0], at[-1] + 1))
            del reps  # before the next batch's are made: one batch of gradients at a time
        return {n: held[n].result() for n in self.names}

    def _candidates(
        self, queries, train, t_rows, candidates, tokens, out, make_header, progress, dtype
    ) -> StreamReport:
        n_q, b = candidates.shape
        if n_q != len(queries):
            raise ValueError(f"candidates has {n_q} rows for {len(queries)} queries")
        mine = (candidates >= t_rows.start) & (candidates < t_rows.stop)  # [Q, b] pairs of this shard
        # Units of queries held at once, as many as the budget holds in the ways planned for them;
        # the union of a unit's candidates in this shard then streams past once, shortest first:
        # each distinct training example is computed once per unit, for every query that holds it.
        # Ways are planned for the pairs per sample of one unit holding every query.
        distinct = len(np.unique(candidates[mine]))
        ways = self._plan(tokens, (int(mine.sum()) + n_q + distinct) / (n_q + distinct))  # pairs and norms
        per_query = bytes_per_sample(self.extraction, ways, tokens)
        check_budget(self.spec.memory_gb, per_query, "one query's representation")
        per_unit = max(1, int(self.spec.memory_gb * 1e9 // per_query))
        units = [(q0, min(q0 + per_unit, n_q)) for q0 in range(0, n_q, per_unit)]
        needed = [np.unique(candidates[q0:q1][mine[q0:q1]]) for q0, q1 in units]  # training rows, once each
        samples = n_q + sum(len(t) for t in needed)
        pairs = int(mine.sum()) + samples  # cross pairs plus every sample's norm
        report = StreamReport(ways=ways, tokens=tokens, pairs_per_sample=pairs / max(samples, 1), n_units=len(units))
        _start(progress, len(units))
        with SimilarityWriter(out, make_header(ways), len(units), dtype) as writer:
            done = writer.done
            report.units_resumed = int(done.sum())
            for u, (q0, q1) in enumerate(units):
                if done[u]:
                    _tick(progress)
                    continue
                nq, cand, ok, need = q1 - q0, candidates[q0:q1], mine[q0:q1], needed[u]
                parts = [reps for _, reps in self.represent(queries[q0:q1])]
                held = {n: concat([reps[n] for reps in parts]) for n in self.names}  # [nq, ...] each
                del parts
                q_sq = np.stack([held[n].self_dots().cpu().numpy() for n in self.names])  # [C, nq]
                # Training examples by length (less padding); pair (query qi, slot ji) -> its example
                order = np.argsort([len(train[t].input_ids) for t in need], kind="stable")
                column = np.empty(len(need), dtype=np.int64)
                column[order] = np.arange(len(need))  # position of need[i] in the length order
                qi, ji = np.nonzero(ok)
                at = column[np.searchsorted(need, cand[qi, ji])]  # [P] the pair's example, in order
                t_sq = np.zeros((len(self.names), len(need)))  # in `need`'s (increasing) order
                dot = np.zeros((len(self.names), nq, b))  # [C, unit queries, b]
                for rows, reps in self.represent([train[t] for t in need[order]], reuse=True):
                    sel = (at >= rows.start) & (at < rows.stop)
                    ia = torch.as_tensor(qi[sel], device=self.device)
                    ib = torch.as_tensor(at[sel] - rows.start, device=self.device)
                    for ci, n in enumerate(self.names):
                        t = reps[n].double()  # converted once, used for its norms and its pairs
                        t_sq[ci, order[rows]] = t.self_dots().cpu().numpy()
                        if len(ia):
                            dot[ci, qi[sel], ji[sel]] = held[n].aligned(ia, t, ib).cpu().numpy()
                del held
                report.samples_computed += nq + len(need)
                writer.write(
                    u,
                    slice(q0, q1),
                    dot,
                    query_sqnorm=q_sq if self.spec.shard == 0 else None,
                    train_rows=need if len(need) else None,
                    train_sqnorm=t_sq if len(need) else None,
                )
                _tick(progress)
        return report


class StreamProducer(SimilarityProducer):
    """The similarity store of `queries` x `train` streamed from the model (a `Streamer` run).

    queries: the whole query table, encoded; query_rows: the target's queries as increasing rows
    of it (default: all; see `Streamer.run`). train: every training example, encoded (a shard job
    computes `spec`'s shard of them)."""

    source = "stream"

    def __init__(
        self,
        extraction: Extraction,
        pad_id: int,
        spec: StreamSpec,
        queries: Sequence[Encoded],
        train: Sequence[Encoded],
        query_rows: np.ndarray | None = None,
    ):
        self.streamer = Streamer(extraction, pad_id, spec)
        self.queries, self.train, self.query_rows = queries, train, query_rows

    def write(self, out: str | Path, target: Target, progress=None) -> StreamReport:
        extraction = self.streamer.extraction

        def make_header(ways: dict[str, str]) -> Header:
            counts = Counter(ways.values())
            log.info("ways (tdabench.factored.choose): %s", ", ".join(f"{w} {n}" for w, n in sorted(counts.items())))
            for name, way in ways.items():
                log.debug("  %s: %s", name, way)
            return target.header(self.source, **component_columns(extraction, ways))

        return self.streamer.run(
            self.queries, self.train, out, make_header, target.candidates, progress, self.query_rows, target.dtype
        )


def _start(progress, total: int) -> None:
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(total)


def _tick(progress) -> None:
    if progress is not None:
        progress.update(1)
