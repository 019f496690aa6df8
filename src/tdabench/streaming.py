"""The similarity store streamed straight from the model: exact per-component dot products and
squared norms with no gradient cache, at any model size (`similarity.source: stream`).

Layouts (tdabench.similarity):
* dense — every query against every training example of this job's shard. Queries are taken in
  chunks whose representations fit `memory_gb`; the shard's training examples stream past each
  chunk once, so a chunk costs one pass over the shard (larger chunks: fewer passes). On the host
  only the first pass runs them through the model: they are kept on disk and read back a
  component at a time (tdabench.spill), and the held queries are then kept as factors where
  those are smaller, each component formed just before its products (`_query`).
* candidates — each query against its candidates only. A unit is as many queries as `memory_gb`
  holds, grouped by shared candidates (`group_queries`), plus the union of their candidates in
  this shard, computed in one batched pass (a shared candidate once).

Each component is represented one of two ways (tdabench.representation), chosen once per job by
`plan_ways` from the multiply-adds of tdabench.factored: materialised (`Dense`: its per-sample
gradient, or count sketch) or factored (`Factors`: a linear layer's inputs and output gradients,
never forming the d_out x d_in gradient). Dot products accumulate in float64 either way.

One pass writes several stores (`Sink`s: a study's settings, each its own file): every training
gradient it computes is dotted with the queries of all of them, so the settings share one pass
over the training examples instead of one each.

`StreamProducer` is this module's `SimilarityProducer` (tdabench.producer); `Streamer` is the
engine it runs.

Resume and shards: units go through `SimilarityWriter` (a partial file with a done mask), so a
killed job resumes where it stopped. A shard job fills only the pairs whose training example lies
in its rows and leaves the rest 0, so `merge_similarity` sums shards exactly; query squared norms
are written by shard 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from tdabench.config import ConfigError
from tdabench.extraction import Extraction
from tdabench.factored import FACTORED, MATERIALISED, choose
from tdabench.gradients import iter_batches
from tdabench.models import Encoded, collate
from tdabench.plan import shard_rows
from tdabench.producer import Report, SimilarityProducer, Target
from tdabench.representation import Collector, Dense, Factors, Representation, concat
from tdabench.similarity import Header, SimilarityWriter
from tdabench.spill import Spill, fits, spill_directory

log = logging.getLogger(__name__)
LAYOUTS = ("dense", "candidates")


@dataclass(frozen=True)
class StreamSpec:
    layout: str  # dense | candidates
    memory_gb: float  # representations held at once: a dense chunk of queries, a candidate unit
    shard: int = 0  # this job's training shard (0-based) ...
    shards: int = 1  # ... of this many near-equal contiguous shards
    spill: bool = True  # dense, on the host: keep the training examples on disk between passes (tdabench.spill)


class InPassTap(Protocol):
    """What a pass hands its formed components to (tdabench.projection_stream.InPass)."""

    def wants(self, name: str) -> bool: ...

    def train(self, name: str, rows: slice, rep: Representation) -> None: ...

    def queries(self, name: str, rep: Representation) -> None: ...


@dataclass(frozen=True)
class Sink:
    """One store a pass writes: its queries as increasing rows of the query table, their candidates
    [Q, b] (candidate layout; None: dense), its header once the ways are planned, its storage dtype.
    The sinks of one pass hold disjoint queries (a study's settings); every training gradient the
    pass computes serves all of them."""

    out: str | Path
    make_header: Callable[[dict[str, str]], Header]
    query_rows: np.ndarray
    candidates: np.ndarray | None = None
    dtype: str = "float64"


@dataclass(kw_only=True)
class StreamReport(Report):
    ways: dict[str, str]  # component -> materialised | factored
    tokens: float  # mean tokens per sample, as the choice of ways assumed
    pairs_per_sample: float
    samples_computed: int = 0  # forward/backward passes of one sample, summed
    chunk_queries: int | None = None  # dense: queries held per chunk
    train_group_rows: int | None = None  # dense: training examples formed and multiplied at once
    spill_gb: float = 0.0  # dense: training examples written to disk for the later passes (tdabench.spill)
    tapped: bool = False  # dense: a tap was handed every component (`Streamer.run`)
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


def group_queries(candidates: np.ndarray, mine: np.ndarray, per_unit: int) -> list[np.ndarray]:
    """The candidate layout's queries in units of at most `per_unit`, grouped so that a unit's
    queries share candidates (each distinct candidate is computed once per unit; two settings'
    queries on one prompt share all b): a unit starts at the first query left and grows by the
    query left with most of its candidates in this shard (`mine` [Q, b]) already in the unit, the
    earliest on ties. Then each query in turn moves to the unit with room where it adds fewest
    candidates, while that lowers the count (`_move_queries`). -> per unit, its query positions,
    increasing."""
    n_q = len(candidates)
    if per_unit >= n_q:
        return [np.arange(n_q)]
    qi, ji = np.nonzero(mine)
    used, column = np.unique(candidates[qi, ji], return_inverse=True)
    incidence = np.zeros((n_q, len(used)), dtype=np.int32)  # [Q, distinct] 1: the query holds it
    incidence[qi, column] = 1
    left, units = np.ones(n_q, dtype=bool), []
    while left.any():
        unit, held = [], np.zeros(len(used), dtype=bool)
        shared = np.zeros(n_q, dtype=np.int64)  # [Q] candidates each query shares with the unit
        while len(unit) < per_unit and left.any():
            q = int(np.argmax(np.where(left, shared, -1)))  # the first query left on ties
            unit.append(q)
            left[q] = False
            new = incidence[q].astype(bool) & ~held
            if new.any():
                shared += incidence[:, new].sum(1)
                held |= new
        units.append(unit)
    return [np.sort(np.array(u, dtype=np.int64)) for u in _move_queries(units, incidence, per_unit)]


def _move_queries(units: list[list[int]], incidence: np.ndarray, per_unit: int) -> list[list[int]]:
    """Local search after the greedy grouping: query by query (unit by unit, in order), move it to
    the unit with room where the distinct candidates summed over units drop most (the first such
    unit on ties), until no move lowers them; a unit left empty is dropped. Each move lowers the
    sum, so the search ends. The greedy fills a unit with queries that share nothing with it once
    its own are in, and leaves them out of the unit that holds their candidates."""
    counts = np.stack([incidence[u].sum(0) for u in units])  # [U, distinct] the unit's queries holding each
    moved = True
    while moved:
        moved = False
        for a in range(len(units)):
            for q in list(units[a]):
                holds = incidence[q].astype(bool)  # [distinct]
                lose = int((counts[a, holds] == 1).sum())  # candidates only q needs in unit a
                add = (counts[:, holds] == 0).sum(1)  # [U] candidates q would add to each unit
                room = np.array([len(u) < per_unit for u in units])
                room[a] = False
                change = np.where(room, add - lose, 0)
                to = int(np.argmin(change))
                if change[to] < 0:
                    units[a].remove(q)
                    units[to].append(q)
                    counts[a] -= incidence[q]
                    counts[to] += incidence[q]
                    moved = True
    return [u for u in units if u]


def group_starts(sizes: Sequence[float], budget: float) -> set[int]:
    """The items (batches, in order, of `sizes` bytes) that open a group, each group as many as
    `budget` bytes hold (at least one)."""
    starts, held = {0}, 0.0
    for i, size in enumerate(sizes):
        if held and held + size > budget:
            starts.add(i)
            held = 0.0
        held += size
    return starts


def shortest_first(examples: Sequence[Encoded]) -> tuple[np.ndarray, np.ndarray]:
    """The order that batches `examples` shortest first (less padding; ties keep their order),
    and where each example lands in it -> (order, place): examples[order[j]] is j-th, and
    examples[i] is place[i]-th."""
    order = np.argsort([len(e.input_ids) for e in examples], kind="stable")
    place = np.empty(len(order), dtype=np.int64)
    place[order] = np.arange(len(order))
    return order, place


def _as_slice(rows: np.ndarray) -> slice | np.ndarray:
    """Consecutive rows as a slice (HDF5 writes a slice faster than a list of rows)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


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
        self._blocks: dict[str, torch.Tensor] | None = None  # dense: the held queries' formed gradients
        self._formed = torch.empty(0)  # dense: a held component formed in the pass (`_query`)
        self._arena = _Arena()  # dense: the held queries' factors (`_hold`)
        self._chunk_bytes = 0.0  # ... sized for the largest chunk
        self._as_returned: dict[str, str] | None = None  # the ways components come back from the model on the host
        self._progress, self._stepped = None, 0  # dense: the pass' bar, and the steps it has been moved
        # Representations and dot products stay where the model is (a GPU's memory, then), only
        # the dot products come back to the host.
        self.device = extraction.device
        self.on_device = self.device.type != "cpu"

    def represent(
        self, examples: Sequence[Encoded], reuse: bool = False, factored: Sequence[str] | None = None
    ) -> Iterator[tuple[slice, dict[str, Representation]]]:
        """(rows, {component: representation}) per padded batch of `examples`. reuse: materialised
        gradients go into buffers reused batch after batch (valid until the next batch).
        factored: the components that come back as `Factors` (default: those planned factored)."""
        factored = self.factored if factored is None else list(factored)
        buffers = {}
        if reuse and not self.on_device:
            formed = [n for n in self.names if n not in factored]
            buffers = self.extraction.buffers(self.extraction.cfg.batch_size, formed)
        for rows, batch in self.extraction.batches(examples, self.pad_id):
            size = rows.stop - rows.start
            out = {n: b[:size] for n, b in buffers.items()}
            yield rows, self.extraction.represent(batch, out=out, factored=factored, on_device=self.on_device)

    def run(
        self,
        queries: Sequence[Encoded],
        train: Sequence[Encoded],
        sinks: Sequence[Sink],
        progress=None,
        tap: InPassTap | None = None,
    ) -> StreamReport:
        """Stream every sink's store of its queries x `train` (or their candidates) in one pass:
        each training gradient is computed once per unit and dotted with the queries of every
        sink (a study's settings share their training gradients).

        queries: the whole query table; the dense layout batches it as a gradients job does and
        keeps the sinks' rows.
        tap: handed every component's formed training examples and queries, where the pass forms
        them all (dense, one unit, read back from disk, every training example and query of the
        table); `report.tapped` says whether it was (tdabench.projection_stream.InPass).
        """
        sinks = list(sinks)
        if not sinks:
            raise ValueError("a pass needs at least one store to write")
        rows = [np.asarray(s.query_rows, dtype=np.int64) for s in sinks]
        if any(len(r) and (np.diff(r) <= 0).any() for r in rows):
            raise ValueError("query_rows must be increasing")
        union = np.sort(np.concatenate(rows))
        if (np.diff(union) == 0).any():
            raise ValueError("the stores of one pass must hold disjoint queries")
        dense = self.spec.layout == "dense"
        for s in sinks:
            if (s.candidates is None) != dense:
                raise ValueError(
                    f"layout {self.spec.layout!r} with candidates={'none' if s.candidates is None else 'given'}"
                )
        at = [np.searchsorted(union, r) for r in rows]  # each sink's queries: positions in the union
        start = time.perf_counter()
        t_rows = shard_rows(len(train), self.spec.shard, self.spec.shards)
        if t_rows.stop == t_rows.start:
            raise ValueError(
                f"config key similarity.shards: shard {self.spec.shard} of {self.spec.shards} holds no training "
                f"example ({len(train)} in all); use at most {len(train)} shards"
            )
        lengths = [len(queries[r].input_ids) for r in union] + [len(e.input_ids) for e in train[t_rows]]
        tokens = float(np.mean(lengths)) if lengths else 1.0
        if dense:
            report = self._dense(queries, union, train, t_rows, tokens, sinks, at, progress, tap)
        else:
            candidates = self._joined_candidates(sinks, rows, at, len(union))
            chosen = [queries[r] for r in union]
            report = self._candidates(chosen, train, t_rows, candidates, tokens, sinks, at, progress)
        report.seconds = time.perf_counter() - start
        return report

    @staticmethod
    def _joined_candidates(sinks: Sequence[Sink], rows, at, n: int) -> np.ndarray:
        """The sinks' candidates [Q_s, b] as one [n, b] in union order."""
        widths = {s.candidates.shape[1] for s in sinks if s.candidates.ndim == 2}
        for s, r in zip(sinks, rows):
            if s.candidates.ndim != 2 or s.candidates.shape[0] != len(r):
                raise ValueError(f"candidates has shape {s.candidates.shape} for {len(r)} queries")
        if len(widths) != 1:
            raise ValueError(f"the stores of one pass need one candidate count b, not {sorted(widths)}")
        joined = np.empty((n, widths.pop()), dtype=np.int64)
        for s, a in zip(sinks, at):
            joined[a] = s.candidates
        return joined

    @contextlib.contextmanager
    def _writers(self, sinks: Sequence[Sink], ways: dict[str, str], n_units: int):
        """Every sink's writer (resumable), with the units each had done when opened."""
        with contextlib.ExitStack() as stack:
            writers = [
                stack.enter_context(SimilarityWriter(s.out, s.make_header(ways), n_units, s.dtype)) for s in sinks
            ]
            yield writers, [w.done for w in writers]

    @staticmethod
    def _in_unit(at: np.ndarray, q0: int, q1: int) -> tuple[slice, np.ndarray]:
        """A sink's queries among union positions [q0, q1): its store rows and their positions in the unit."""
        s0, s1 = (int(i) for i in np.searchsorted(at, [q0, q1]))
        return slice(s0, s1), at[s0:s1] - q0

    def _plan(self, tokens: float, pairs_per_sample: float) -> dict[str, str]:
        ways = plan_ways(self.extraction, tokens, pairs_per_sample)
        self.factored = [n for n, w in ways.items() if w == FACTORED]
        counts = Counter(ways.values())
        log.info("ways (tdabench.factored.choose): %s", ", ".join(f"{w} {n}" for w, n in sorted(counts.items())))
        for name, way in ways.items():
            log.debug("  %s: %s", name, way)
        return ways

    def _dense(self, queries, query_rows, train, t_rows, tokens, sinks, at, progress, tap=None) -> StreamReport:
        n_t = t_rows.stop - t_rows.start
        # Query batches as a gradients job batches the whole query table (so the per-sample
        # gradients, and the store, agree with the cached path's); those holding none are skipped.
        batches = [
            (rows, query_rows[(query_rows >= rows.start) & (query_rows < rows.stop)])
            for rows in iter_batches(len(queries), self.extraction.cfg.batch_size)
        ]
        batches = [(rows, mine) for rows, mine in batches if len(mine)]
        position = {int(r): i for i, r in enumerate(query_rows)}  # table row -> position among the pass' queries
        t_sq = None  # [C, T] the training examples' squared norms: the first pass computes them
        groups = self._group_batches(train[t_rows])
        need = self._on_disk_bytes(sinks[0].out, groups)  # None: not kept on disk
        keep = need is not None
        # On disk, the training examples come back a component at a time, all in one product: a
        # held query's component can then be formed just before it (once per pass, as if formed
        # when held), so queries are held as factors where those are smaller (`later`).
        later = self._formed_later(queries, batches) if keep else []
        chunks, chunk = self._chunks(queries, batches, later, len(query_rows))
        pps = (chunk * n_t + chunk + n_t) / (chunk + n_t)  # cross pairs plus every sample's norm
        ways = self._plan(tokens, pps)
        report = StreamReport(ways=ways, tokens=tokens, pairs_per_sample=pps, n_units=len(chunks), chunk_queries=chunk)
        report.train_group_rows = max(g[-1][0].stop - g[0][0].start for g in groups)
        with self._writers(sinks, ways, len(chunks)) as (writers, done), contextlib.ExitStack() as stack:
            report.units_resumed = int(np.logical_and.reduce(done).sum())
            later = [n for n in later if n not in self.factored]  # (planned factored: held as factors anyway)
            # A tap takes every sample's components as the disk path forms them: one unit, the
            # whole table's queries and every training example, nothing resumed.
            tapping = (
                tap is not None
                and keep
                and len(chunks) == 1
                and report.units_resumed == 0
                and np.array_equal(query_rows, np.arange(len(queries)))
                and (t_rows.start, t_rows.stop) == (0, len(train))
            )
            if not later and not tapping and len(chunks) - report.units_resumed < 2:  # one pass: nothing to read back
                keep = False
            spill = stack.enter_context(self._spill(sinks[0].out, need)) if keep else None
            if spill is not None:  # rows multiplied at once, at the widest component
                report.train_group_rows = self._at_once(groups, max(self.extraction.stored_dims))
            todo = [u for u in range(len(chunks)) if not all(d[u] for d in done)]
            steps = self._steps(chunks, groups, spill, progress, todo)  # the bar's count after each unit
            for u, part in enumerate(chunks):
                if all(d[u] for d in done):
                    self._step(steps[u] - self._stepped)
                    continue
                q0 = position[int(part[0][1][0])]
                q1 = position[int(part[-1][1][-1])] + 1  # the chunk's queries: positions [q0, q1)
                if spill is not None:  # first, with nothing held (what the model pass leaves is not held beside it)
                    report.samples_computed += self._fill(spill, groups)
                held = self._hold(queries, part, position, q0, q1, chunk, later)  # {component: [chunk, ...]}
                report.samples_computed += sum(rows.stop - rows.start for rows, _ in part)
                q_sq, t_sq, dot, computed = self._pass(held, groups, t_sq, spill, tap if tapping else None)
                report.tapped = tapping
                report.samples_computed += computed
                del held  # before the next chunk is held: one chunk at a time
                for writer, d, a in zip(writers, done, at):
                    if d[u]:
                        continue
                    rows, local = self._in_unit(a, q0, q1)
                    has = len(local) > 0
                    writer.write(
                        u,
                        rows,
                        dot[:, local] if has else None,
                        columns=t_rows,
                        query_sqnorm=q_sq[:, local] if has and self.spec.shard == 0 else None,
                        train_rows=t_rows,
                        train_sqnorm=t_sq,
                    )
                self._step(steps[u] - self._stepped)  # (whatever a path did not count on its way)
            report.spill_gb = spill.bytes / 1e9 if spill is not None else 0.0
        self._blocks, self._formed = None, torch.empty(0)
        self._arena.reset(0)
        self._progress = None
        return report

    def _steps(self, chunks, groups, spill: Spill | None, progress, todo: list[int]) -> list[int]:
        """Start the dense pass' bar in steps, so that a pass of one unit moves too: each training
        batch through the model (with a spill: those not on disk yet, in the first unit `todo`;
        else every one, in each unit), each query batch held and each component multiplied (per
        group of training examples). -> the bar's count after each unit."""
        n_batches = sum(map(len, groups))
        if spill is not None:
            model, pass_groups = 0, 1
        else:
            model, pass_groups = n_batches, n_batches if self.on_device else len(groups)
        unit = [len(part) + model + len(self.names) * pass_groups for part in chunks]
        if spill is not None and todo:
            unit[todo[0]] += n_batches - len(spill.saved)
        self._progress, self._stepped = progress, 0
        _start(progress, sum(unit))
        return np.cumsum(unit).tolist()

    def _step(self, n: int = 1) -> None:
        if self._progress is not None and n > 0:
            _tick(self._progress, n)
            self._stepped += n

    def _on_disk_bytes(self, out: str | Path, groups: list[list[tuple[slice, dict]]]) -> float | None:
        """The bytes of training examples the job keeps on disk (`_spill`), or None where it does
        not: on a GPU (the model is fast there, and its results stay on the device), when turned
        off, or when the disk lacks room for them (`fits`)."""
        if self.on_device or not self.spec.spill:
            return None
        need = sum(self._held_bytes(batch) for group in groups for batch in group)
        directory = spill_directory(out)
        ok, free = fits(directory, need)
        if not ok:
            log.info(
                "training examples not kept on disk between passes: %.1f GB needed twice, %.1f GB free at %s",
                need / 1e9,
                free / 1e9,
                directory.parent,
            )
        return need if ok else None

    @contextlib.contextmanager
    def _spill(self, out: str | Path, need: float) -> Iterator[Spill]:
        """The job's `Spill` of training examples beside `out`, removed when the job ends."""
        spill = Spill(spill_directory(out))
        log.info("training examples kept on disk (about %.1f GB, %s)", need / 1e9, spill.directory)
        try:
            yield spill
        finally:
            spill.close()

    def _pass(
        self,
        held: dict[str, Representation | list],
        groups: list[list[tuple[slice, dict]]],
        t_sq: np.ndarray | None,
        spill: Spill | None = None,
        tap: InPassTap | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """One pass of the training batches (`_group_batches`) against a held chunk (`_hold`) ->
        (query_sqnorm [C, chunk], train_sqnorm [C, T], dot [C, chunk, T], training examples run
        through the model). t_sq: the norms from an earlier pass (the same numbers: not computed
        again), or None.

        With a `spill`, the groups it lacks go through the model onto disk first, and the pass
        then reads the training examples back one component at a time (`_from_disk`); without,
        they come from the model a group at a time (`_training`). tap (with a spill): handed each
        component's training examples, then its queries, as the pass has them."""
        n_q, n_t = self._held_rows(held), groups[-1][-1][0].stop
        fresh = t_sq is None
        t_sq = np.zeros((len(self.names), n_t)) if fresh else t_sq
        q_sq = np.zeros((len(self.names), n_q))
        dot = np.zeros((len(self.names), n_q, n_t))
        if spill is None:
            computed, source = n_t, self._training(groups)
        else:
            computed, source = self._fill(spill, groups), self._from_disk(spill, groups)
        for g, parts in enumerate(source):
            for ci, n in enumerate(self.names):
                q = self._query(held, n)  # (a component held as factors: formed now, once a group)
                own = g == 0  # the held queries' norms: with their first product
                taking = tap is not None and tap.wants(n)
                for rows, rep in parts(n):
                    if taking:
                        tap.train(n, rows, rep)
                    t = rep.ready()  # factors converted once, used for norms and every query
                    gram, sq_q, sq_t = q.gram_and_norms(t, own, fresh)
                    dot[ci, :, rows] = gram.cpu().numpy()
                    if sq_q is not None:
                        q_sq[ci] = sq_q.cpu().numpy()
                        own = False
                    if sq_t is not None:
                        t_sq[ci, rows] = sq_t.cpu().numpy()
                    del rep, t, gram
                if own:  # (no training piece came)
                    q_sq[ci] = q.self_dots().cpu().numpy()
                if taking:
                    tap.queries(n, q)
                del q
                self._step()
            del parts  # (before the next group is made: one group at a time)
        return q_sq, t_sq, dot, computed

    @staticmethod
    def _held_rows(held: dict[str, Representation | list]) -> int:
        rep = next(iter(held.values()))
        return rep[-1][0].stop if isinstance(rep, list) else rep.rows

    def _query(self, held: dict[str, Representation | list], n: str) -> Representation:
        """A held chunk's component: as held, or (held as factors to be formed later: a list of
        (rows, batch piece)) formed into one reused buffer by the extractor's product, the
        product the model's pass forms it with."""
        pieces = held[n]
        if not isinstance(pieces, list):
            return pieces
        dim = dict(zip(self.names, self.extraction.stored_dims))[n]
        grads = self._formed[: pieces[-1][0].stop * dim].view(-1, dim)  # [chunk, d_c]
        extractor = self.extraction.extractor()
        for at, rep in pieces:
            if isinstance(rep, Factors):
                extractor.form(n, rep, out=grads[at])
            else:  # (a layer the batched pass gave up on comes back formed by the loop)
                grads[at] = rep.tensor
        return Dense(grads)

    def _fill(self, spill: Spill, groups: list[list[tuple[slice, dict]]]) -> int:
        """Run the batches `spill` lacks through the model onto disk, one batch at a time ->
        training examples run through the model."""
        factors = self.extraction.factorable()
        computed = 0
        for key, (rows, batch) in enumerate(b for group in groups for b in group):
            if key not in spill.saved:
                spill.save(key, rows, self.extraction.represent(batch, factored=factors))
                computed += rows.stop - rows.start
                self._step()
        return computed

    def _from_disk(
        self, spill: Spill, groups: list[list[tuple[slice, dict]]]
    ) -> Iterator[Callable[[str], Iterator[tuple[slice, Representation]]]]:
        """The training examples of one pass read back from `spill`, all of them at once: one
        function giving a component's (rows, representation). A component planned materialised
        is formed for as many training examples as the group budget holds at its width (every
        example of a SmolLM2 shard) with the extractor's own product, into one reused buffer, so
        each held query block is converted to float64 once per pass and multiplied with them in
        one wide product; one planned factored comes batch by batch, as factors."""
        extractor = self.extraction.extractor()
        dims = dict(zip(self.names, self.extraction.stored_dims))
        formed = torch.empty(0)

        def parts(n: str) -> Iterator[tuple[slice, Representation]]:
            nonlocal formed
            batches = (spill.load(key, n) for key in range(sum(map(len, groups))))  # a batch's file at a time
            if n in self.factored:
                yield from batches
                return
            at_once = self._at_once(groups, dims[n])
            if formed.numel() < at_once * dims[n]:
                formed = torch.empty(0)  # (freed before the larger one is made)
                formed = torch.empty(at_once * dims[n])
            grads = formed[: at_once * dims[n]].view(at_once, dims[n])  # [rows, d_c]
            first = stop = 0
            for rows, rep in batches:
                if rows.stop - first > at_once:  # this batch opens the next product
                    yield slice(first, stop), Dense(grads[: stop - first])
                    first = rows.start
                at = slice(rows.start - first, rows.stop - first)
                if isinstance(rep, Factors):
                    extractor.form(n, rep, out=grads[at])
                else:  # not factorable, or a layer the batched pass gave up on (formed by the loop)
                    grads[at] = rep.tensor
                stop = rows.stop
            yield slice(first, stop), Dense(grads[: stop - first])

        yield parts

    def _at_once(self, groups: list[list[tuple[slice, dict]]], dim: int) -> int:
        """Training rows `_from_disk` forms at once for a component of `dim`: as many as the
        largest group holds as it comes from the model, or as one formed group of the widest
        component takes (at SmolLM2's size every example of a shard)."""
        n_t = groups[-1][-1][0].stop
        rows_of = [g[-1][0].stop - g[0][0].start for g in groups]
        group_bytes = max(sum(self._held_bytes(batch) for batch in group) for group in groups)
        budget = max(group_bytes, 4.0 * max(self.extraction.stored_dims) * max(rows_of))  # bytes formed at once
        return min(n_t, max(1, int(budget // (4 * dim))))

    def _training(
        self, groups: list[list[tuple[slice, dict]]]
    ) -> Iterator[Callable[[str], list[tuple[slice, Representation]]]]:
        """The training examples of one pass, a group of batches at a time: per group, a function
        giving a component's [(rows, representation)].

        On the host every factorable component comes back from the model as factors, and those
        planned materialised are formed one component at a time for the whole group, into one
        reused [group, d_c] buffer, with the extractor's own product (the same gradients as
        formed in the pass). Held as factors, a group of several batches takes less memory than
        one batch of formed gradients, and each held query is read once per group rather than
        once per batch: its products with the group are one wider product (faster per pair)."""
        if self.on_device:  # formed in the pass, batch by batch, and kept on the device
            for rows, batch in (b for group in groups for b in group):
                reps = self.extraction.represent(batch, factored=self.factored, on_device=True)
                self._step()
                yield lambda n, rows=rows, reps=reps: [(rows, reps[n])]
            return
        factors = self.extraction.factorable()
        formed_later = set(factors) - set(self.factored)
        formed_now = [n for n in self.names if n not in factors]  # (into buffers reused group after group)
        extractor = self.extraction.extractor()
        dims = dict(zip(self.names, self.extraction.stored_dims))
        width = max([dims[n] for n in formed_later], default=0)
        rows_max = max(group[-1][0].stop - group[0][0].start for group in groups)
        formed = torch.empty(rows_max * width)  # [group, d_c] of one component at a time
        buffers = self.extraction.buffers(rows_max, formed_now)
        for group in groups:
            first, stop = group[0][0].start, group[-1][0].stop
            reps = []
            for rows, batch in group:
                out = {n: b[rows.start - first : rows.stop - first] for n, b in buffers.items()}
                reps.append((rows, self.extraction.represent(batch, out=out, factored=factors)))
                self._step()

            def parts(n: str, reps=reps, first=first, stop=stop) -> list[tuple[slice, Representation]]:
                if n in formed_now:
                    return [(slice(first, stop), Dense(buffers[n][: stop - first]))]
                if n not in formed_later:  # planned factored: products batch by batch, as factors
                    return [(rows, r[n]) for rows, r in reps]
                grads = formed[: (stop - first) * dims[n]].view(stop - first, dims[n])
                for rows, r in reps:
                    rep, at = r.pop(n), slice(rows.start - first, rows.stop - first)
                    if isinstance(rep, Factors):
                        extractor.form(n, rep, out=grads[at])
                    else:  # (a layer the batched pass gave up on comes back formed by the loop)
                        grads[at] = rep.tensor
                return [(slice(first, stop), Dense(grads))]

            yield parts
            del reps, parts  # (the group goes before the next one is made)

    def _held_bytes(self, batch: tuple[slice, dict]) -> float:
        """The memory a training batch (rows, padded batch) holds as it comes back from the model
        on the host: factorable components as factors, others formed."""
        rows, padded = batch
        if self._as_returned is None:
            factors = set(self.extraction.factorable())
            self._as_returned = {n: FACTORED if n in factors else MATERIALISED for n in self.names}
        return (rows.stop - rows.start) * bytes_per_sample(
            self.extraction, self._as_returned, padded["input_ids"].shape[1]
        )

    def _group_batches(self, train: Sequence[Encoded]) -> list[list[tuple[slice, dict]]]:
        """The training batches (rows, padded batch) in groups that hold, as factors, at most half
        what one batch of formed gradients would (at least one batch a group; on a GPU, one)."""
        batches = list(self.extraction.batches(train, self.pad_id))
        if self.on_device:
            return [[b] for b in batches]
        factors = self.extraction.factorable()
        ways = {n: FACTORED if n in factors else MATERIALISED for n in self.names}
        tokens = max((b["input_ids"].shape[1] for _, b in batches), default=1)
        formed = bytes_per_sample(self.extraction, dict.fromkeys(self.names, MATERIALISED), tokens)
        held = bytes_per_sample(self.extraction, ways, tokens)
        per_group = max(1, int(formed // (2 * held)))
        return [batches[i : i + per_group] for i in range(0, len(batches), per_group)]

    def _hold(
        self, queries, part, position, q0: int, q1: int, capacity: int, later: Sequence[str] = ()
    ) -> dict[str, Representation | list]:
        """A chunk's query representations, one per component, rows in store order [q0, q1):
        whole table batches computed, the pass' rows kept. On the host, formed gradients go
        straight into blocks of `capacity` rows reused chunk after chunk (a fresh block would
        cost a page fault per page: as much as computing the gradients, at 100 M parameters).
        Components in `later` are kept as each batch's factors, (rows, piece) in a list, and
        formed when the pass reaches them (`_query`)."""
        held: dict[str, Collector] = {}
        pieces: dict[str, list] = {n: [] for n in later}
        blocks = {}
        if not self.on_device:
            formed = [n for n in self.names if n not in self.factored and n not in later]
            if self._blocks is None or next(iter(self._blocks.values()), torch.empty(0)).shape[0] < capacity:
                self._blocks = None  # (freed before the larger ones are made)
                self._blocks = self.extraction.buffers(capacity, formed)
            blocks = {n: self._blocks[n][: q1 - q0] for n in formed}
            dims = dict(zip(self.names, self.extraction.stored_dims))
            widest = capacity * max([dims[n] for n in later], default=0)
            if later and self._formed.numel() < widest:
                self._formed = torch.empty(0)
                self._formed = torch.empty(widest)  # [capacity, widest of `later`], a component at a time
            if later:
                self._arena.reset(self._chunk_bytes)
        for rows, mine in part:
            batch = collate(list(queries[rows]), self.pad_id)
            at = slice(position[int(mine[0])] - q0, position[int(mine[-1])] - q0 + 1)  # consecutive
            whole = len(mine) == rows.stop - rows.start  # every row of the batch is kept: write in place
            out = {n: b[at] for n, b in blocks.items()} if whole else {}
            factored = [*self.factored, *later]
            reps = self.extraction.represent(batch, out=out, factored=factored, on_device=self.on_device)
            local = torch.as_tensor(mine - rows.start, device=self.device)
            for n, r in reps.items():
                if n in out:
                    continue
                if n in pieces:
                    pieces[n].append((at, self._arena.keep(r if whole else r.take(local))))
                elif n in blocks:
                    torch.index_select(r.tensor, 0, local, out=blocks[n][at])
                else:
                    held.setdefault(n, r.collector(q1 - q0)).add(r, local, at)
            del reps  # before the next batch's are made: one batch of gradients at a time
            self._arena.next_batch()
            self._step()
        return {
            n: pieces[n] if n in pieces else Dense(blocks[n]) if n in blocks else held[n].result() for n in self.names
        }

    def _formed_later(self, queries, batches) -> list[str]:
        """The factorable components, unsketched, whose factors at the pass' longest query batch
        are smaller than the formed gradient: held so, and formed in the pass (`_hold`)."""
        tokens = max(self._padded(queries, rows) for rows, _ in batches)
        shapes = {c.name: c.shape for c in self.extraction.components}
        sketched = self.extraction.sketch_info
        return [
            n
            for n in self.extraction.factorable()
            if n not in sketched and tokens * sum(shapes[n]) < math.prod(shapes[n])
        ]

    def _padded(self, queries, rows: slice) -> int:
        """The padded length of the query table's batch `rows`."""
        return collate(list(queries[rows]), self.pad_id)["input_ids"].shape[1]

    def _chunks(self, queries, batches, later: Sequence[str], n_queries: int) -> tuple[list[list], int]:
        """The pass' query batches in chunks held at once, as many whole batches as the budget
        holds (at least one) -> (chunks, the most queries a chunk holds). Sized as held: formed
        (materialised: an upper bound, the ways then follow from the pairs) or, for `later`, as
        factors at the batch's own padded length plus a row of the buffer they are formed in."""
        bs = self.extraction.cfg.batch_size
        formed = dict.fromkeys(self.names, MATERIALISED)
        if not later:
            per_query = bytes_per_sample(self.extraction, formed, 0.0)
            largest = max(len(mine) for _, mine in batches)
            check_budget(self.spec.memory_gb, per_query * largest, f"one batch of query gradients ({largest} queries)")
            per_chunk = max(1, int(self.spec.memory_gb * 1e9 // (per_query * bs)))
            chunks = [batches[i : i + per_chunk] for i in range(0, len(batches), per_chunk)]
            return chunks, min(per_chunk * bs, n_queries)
        ways = {**formed, **dict.fromkeys(later, FACTORED)}
        dims = dict(zip(self.names, self.extraction.stored_dims))
        buffer_row = 4.0 * max(dims[n] for n in later)
        sizes = [
            len(mine) * (bytes_per_sample(self.extraction, ways, self._padded(queries, rows)) + buffer_row)
            for rows, mine in batches
        ]
        largest = int(np.argmax(sizes))
        what = f"one batch of query gradients ({len(batches[largest][1])} queries, as factors where smaller)"
        check_budget(self.spec.memory_gb, sizes[largest], what)
        starts = sorted(group_starts(sizes, self.spec.memory_gb * 1e9)) + [len(batches)]
        chunks = [batches[a:b] for a, b in zip(starts, starts[1:])]
        self._chunk_bytes = max(sum(sizes[a:b]) for a, b in zip(starts, starts[1:]))  # (an upper bound)
        return chunks, max(sum(len(mine) for _, mine in c) for c in chunks)

    def _candidates(self, queries, train, t_rows, candidates, tokens, sinks, at, progress) -> StreamReport:
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
        units = group_queries(candidates, mine, per_unit)  # [unit] increasing query positions
        needed = [np.unique(candidates[q][mine[q]]) for q in units]  # training rows, once each
        samples = n_q + sum(len(t) for t in needed)
        pairs = int(mine.sum()) + samples  # cross pairs plus every sample's norm
        report = StreamReport(ways=ways, tokens=tokens, pairs_per_sample=pairs / max(samples, 1), n_units=len(units))
        # On the host a training batch's components planned materialised come back as factors too
        # and are formed one at a time into one reused buffer, with the extractor's own product
        # (the same gradients as formed in the pass): the batch's factors, which the pass holds
        # anyway, and one formed component, rather than every component formed at once.
        later = [] if self.on_device else [n for n in self.extraction.factorable() if n not in self.factored]
        extractor = self.extraction.extractor()
        dims = dict(zip(self.names, self.extraction.stored_dims))
        formed = torch.empty(self.extraction.cfg.batch_size * max([0] + [dims[n] for n in later]))
        _start(progress, len(units))
        with self._writers(sinks, ways, len(units)) as (writers, done):
            report.units_resumed = int(np.logical_and.reduce(done).sum())
            for u, unit in enumerate(units):
                if all(d[u] for d in done):
                    _tick(progress)
                    continue
                nq, cand, ok, need = len(unit), candidates[unit], mine[unit], needed[u]
                # The unit's queries and then its training examples go through the model shortest
                # first; held_row[i]: the held row of the unit's i-th query
                by_length, held_row = shortest_first([queries[q] for q in unit])
                parts = [reps for _, reps in self.represent([queries[q] for q in unit[by_length]])]
                held = {}  # [nq, ...] each; a component's batches let go as it is joined: not twice the unit
                for n in self.names:
                    held[n] = concat([reps.pop(n) for reps in parts])
                del parts
                q_sq = np.stack([held[n].self_dots().cpu().numpy()[held_row] for n in self.names])  # [C, nq]
                # column[i]: place of need[i] in the length order; pair (query qi, slot ji) -> its example
                order, column = shortest_first([train[t] for t in need])
                qi, ji = np.nonzero(ok)
                at_pair = column[np.searchsorted(need, cand[qi, ji])]  # [P] the pair's example, in order
                t_sq = np.zeros((len(self.names), len(need)))  # in `need`'s (increasing) order
                dot = np.zeros((len(self.names), nq, b))  # [C, unit queries, b]
                batches = self.represent([train[t] for t in need[order]], reuse=True, factored=[*self.factored, *later])
                for rows, reps in batches:
                    sel = (at_pair >= rows.start) & (at_pair < rows.stop)
                    ia = torch.as_tensor(held_row[qi[sel]], device=self.device)
                    ib = torch.as_tensor(at_pair[sel] - rows.start, device=self.device)
                    for ci, n in enumerate(self.names):
                        t = reps.pop(n)  # (let go once used: `formed` holds one component at a time)
                        if n in later and isinstance(t, Factors):  # formed now, as the pass would have
                            t = Dense(extractor.form(n, t, out=formed[: t.rows * dims[n]].view(t.rows, dims[n])))
                        t = t.ready()  # factors converted once, used for its norms and its pairs
                        if len(ia):
                            pairs, sq = held[n].aligned_and_norms(ia, t, ib)
                            dot[ci, qi[sel], ji[sel]] = pairs.cpu().numpy()
                        else:
                            sq = t.self_dots()
                        t_sq[ci, order[rows]] = sq.cpu().numpy()
                del held
                report.samples_computed += nq + len(need)
                for writer, d, a in zip(writers, done, at):
                    if d[u]:
                        continue
                    rows = np.flatnonzero(np.isin(a, unit))  # this store's queries in the unit (increasing)
                    local = np.searchsorted(unit, a[rows])  # ... and their places in the unit
                    has = len(local) > 0
                    # the norms of this store's own candidates only: as a pass of its queries alone
                    own = np.unique(cand[local][ok[local]]) if has else need[:0]
                    writer.write(
                        u,
                        _as_slice(rows),
                        dot[:, local] if has else None,
                        query_sqnorm=q_sq[:, local] if has and self.spec.shard == 0 else None,
                        train_rows=own if len(own) else None,
                        train_sqnorm=t_sq[:, np.searchsorted(need, own)] if len(own) else None,
                    )
                _tick(progress)
        return report


class _Arena:
    """One block of memory that held factors are copied into, batch after batch. Kept as they
    come from the model, a chunk's factors (a megabyte or so a tensor, thousands of them) would
    sit between the model's freed temporaries, and the process would hold about 1.4 times their
    size (measured at SmolLM2's shape); in one block it holds what they take. A tensor several
    components share (a layer input) is copied once a batch."""

    def __init__(self):
        self.buffer, self.used = torch.empty(0), 0
        self.copies: dict[tuple, torch.Tensor] = {}

    def reset(self, nbytes: float) -> None:
        """Empty it, with room for `nbytes` (an upper bound: pages never written cost nothing)."""
        numel = int(nbytes // 4) + 1
        if self.buffer.numel() < numel or nbytes == 0:
            self.buffer = torch.empty(0)  # (freed before the larger one is made)
            self.buffer = torch.empty(numel) if nbytes else self.buffer
        self.used, self.copies = 0, {}

    def next_batch(self) -> None:
        self.copies = {}

    def keep(self, rep: Representation) -> Representation:
        """`rep` with its factors copied in (as they are when they do not fit or are not float32)."""
        if not isinstance(rep, Factors):
            return rep
        return Factors(self._copy(rep.x), self._copy(rep.g))

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in self.copies:
            return self.copies[key]
        if t.dtype != torch.float32 or t.device.type != "cpu" or self.used + t.numel() > self.buffer.numel():
            return t
        out = self.buffer[self.used : self.used + t.numel()].view(t.shape).copy_(t)
        self.used += t.numel()
        self.copies[key] = out
        return out


class StreamProducer(SimilarityProducer):
    """Similarity stores of `queries` x `train` streamed from the model (a `Streamer` run).

    queries: the whole query table, encoded, with its ids (`query_ids`; default: a target holds
    every query, in order); a target's queries are found among them by id, in increasing rows.
    train: every training example, encoded (a shard job computes `spec`'s shard of them).
    `write_all` writes several targets (a study's settings) in one pass."""

    source = "stream"

    def __init__(
        self,
        extraction: Extraction,
        pad_id: int,
        spec: StreamSpec,
        queries: Sequence[Encoded],
        train: Sequence[Encoded],
        query_ids: Sequence[str] | None = None,
    ):
        self.streamer = Streamer(extraction, pad_id, spec)
        self.queries, self.train = queries, train
        if query_ids is not None and len(query_ids) != len(queries):
            raise ValueError(f"{len(query_ids)} query ids for {len(queries)} queries")
        self.row_of = None if query_ids is None else {q: i for i, q in enumerate(query_ids)}

    def write(self, out: str | Path, target: Target, progress=None) -> StreamReport:
        return self.write_all([out], [target], progress)

    def write_all(
        self, outs: Sequence[str | Path], targets: Sequence[Target], progress=None, tap: InPassTap | None = None
    ) -> StreamReport:
        """Every target's store (to the `outs` alongside) from one pass over the training examples
        (and, where it can, `tap` handed the pass' formed components: `Streamer.run`)."""
        sinks = [self._sink(o, t) for o, t in zip(outs, targets, strict=True)]
        return self.streamer.run(self.queries, self.train, sinks, progress, tap)

    def _sink(self, out: str | Path, target: Target) -> Sink:
        if self.row_of is None:
            rows = np.arange(len(target.query_ids))
            if len(rows) != len(self.queries):
                raise ValueError(f"a target of {len(rows)} queries needs the query ids of all {len(self.queries)}")
        else:
            missing = [q for q in target.query_ids if q not in self.row_of]
            if missing:
                raise KeyError(f"query ids not in the query table: {missing[:5]}")
            rows = np.array([self.row_of[q] for q in target.query_ids], dtype=np.int64)
        extraction = self.streamer.extraction

        def make_header(ways: dict[str, str]) -> Header:
            return target.header(self.source, **component_columns(extraction, ways))

        return Sink(out, make_header, rows, target.candidates, target.dtype)


def _start(progress, total: int) -> None:
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(total)


def _tick(progress, n: int = 1) -> None:
    if progress is not None:
        progress.update(n)
