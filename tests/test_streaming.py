"""The streamed similarity store against the cached one (gradient store -> build_similarity), in
both layouts, factored and materialised, sharded and merged, and resumed after a kill."""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tdabench.cached import build_similarity
from tdabench.components import component_registry
from tdabench.config import ConfigError
from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.factored import FACTORED, MATERIALISED
from tdabench.models import Encoded
from tdabench.plan import shard_rows
from tdabench.producer import Target
from tdabench.similarity import load_similarity, merge_similarity
from tdabench.store import GradientStore, GradientStoreWriter
from tdabench.streaming import StreamProducer, StreamSpec, shortest_first

from helpers import VOCAB, tiny_llama

COMPONENTS = ("q", "v", "down", "lm_head", "norm")  # linear weights, the tied-free head, RMSNorm (vmap)
N_TRAIN, N_QUERY, B = 11, 7, 4


def examples(n, seed):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length, prompt = int(g.integers(5, 12)), int(g.integers(1, 4))
        ids = [int(t) for t in g.integers(1, VOCAB, length)]
        out.append(Encoded(ids, [-100] * prompt + ids[prompt:], prompt, False))
    return out


def cfg(batch_size=4, cap=None):
    return ExtractionConfig(COMPONENTS, batch_size, cap, 0, None)


def setup(cap=None, batch_size=4):
    model = tiny_llama()
    train, queries = examples(N_TRAIN, 1), examples(N_QUERY, 2)
    gt = np.random.default_rng(3).integers(0, N_TRAIN, N_QUERY)
    return Extraction(model, cfg(batch_size, cap)), train, queries, gt


def candidates_of(gt, seed=4):
    g = np.random.default_rng(seed)
    cand = np.stack([g.choice(N_TRAIN, B, replace=False) for _ in gt])
    missing = ~(cand == gt[:, None]).any(1)
    cand[missing, -1] = gt[missing]
    return cand


def cached_store(extraction, train, queries, gt, path, candidates=None):
    """The cached path: gradient stores of both splits, then build_similarity."""
    stores = {}
    for split, exs in (("train", train), ("queries", queries)):
        ids = [f"{split}{i}" for i in range(len(exs))]
        p = path.parent / f"{split}.h5"
        with GradientStoreWriter(
            p, ids, extraction.components, "float32", {"model_fingerprint": "m"}, extraction.sketch_info
        ) as w:
            for rows, batch in extraction.batches(exs, 0):
                w.write(rows, {n: g.numpy() for n, g in extraction(batch).items()})
        stores[split] = p
    with GradientStore(stores["train"]) as t, GradientStore(stores["queries"]) as q:
        build_similarity(t, q, q.sample_ids, [f"train{i}" for i in gt], path, "s", candidates=candidates)
    return load_similarity(path)


def streamed_store(
    extraction,
    train,
    queries,
    gt,
    path,
    layout="dense",
    candidates=None,
    memory_gb=1.0,
    shard=0,
    shards=1,
    ways=None,
    spill=True,
):
    producer = StreamProducer(extraction, 0, StreamSpec(layout, memory_gb, shard, shards, spill), queries, train)
    query_ids, train_ids = [f"queries{i}" for i in range(len(queries))], [f"train{i}" for i in range(len(train))]
    if ways is not None:  # force one way where it is possible
        import tdabench.streaming as s

        real = s.plan_ways
        s.plan_ways = lambda ex, t, p: {n: (ways if n in ex.factorable() else MATERIALISED) for n in ex.names}
    try:
        report = producer.write(path, Target(query_ids, train_ids, gt, candidates, {"setting": "s"}))
    finally:
        if ways is not None:
            s.plan_ways = real
    return report


SETTINGS = {"a": np.array([0, 2, 3, 6]), "b": np.array([1, 4, 5])}  # two settings' rows, interleaved


def settings_stores(extraction, train, queries, gt, paths, layout="dense", candidates=None, memory_gb=1.0):
    """Both settings' stores (`paths`: setting -> file) written by one pass (`write_all`)."""
    ids = [f"queries{i}" for i in range(len(queries))]
    producer = StreamProducer(extraction, 0, StreamSpec(layout, memory_gb), queries, train, ids)
    train_ids = [f"train{i}" for i in range(len(train))]
    targets = [
        Target(
            [ids[r] for r in rows],
            train_ids,
            gt[rows],
            None if candidates is None else candidates[rows],
            {"setting": s},
        )
        for s, rows in SETTINGS.items()
    ]
    return producer.write_all([paths[s] for s in SETTINGS], targets)


def smallest_memory_gb(tmp_path, layout="dense", candidates=None, ways=None) -> float:
    """The smallest similarity.memory_gb the streamer accepts, as its error names it."""
    extraction, train, queries, gt = setup()
    with pytest.raises(ConfigError, match=r"config key similarity\.memory_gb: 1e-15 GB cannot hold") as e:
        path = tmp_path / "refused.h5"
        streamed_store(extraction, train, queries, gt, path, layout, candidates, memory_gb=1e-15, ways=ways)
    assert not (tmp_path / "refused.h5").exists() and not (tmp_path / ".refused.h5.partial").exists()
    return float(re.search(r"the smallest value that works is (\S+)$", str(e.value)).group(1))


def assert_same_numbers(got, want, rtol=1e-9):
    """Norms to `rtol`; each dot to `rtol` of the product of its two norms (a dot near 0 is the
    difference of large terms: the factored form does not round the gradient to float32 first)."""
    assert got.components == want.components and got.query_ids == want.query_ids
    for name in ("query_sqnorm", "train_sqnorm"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=rtol)
    scale = np.sqrt(want.query_sqnorm[:, :, None] * want.train_sqnorm[:, None, :])  # [C, Q, T]
    if want.candidates is not None:
        scale = np.take_along_axis(scale, want.candidates[None], axis=2)
    assert (np.abs(got.dot - want.dot) <= rtol * scale + 1e-300).all()


@pytest.mark.parametrize("way", [MATERIALISED, FACTORED])
@pytest.mark.parametrize("memory_gb", [1.0, "smallest"])  # everything in one chunk; one batch per chunk
def test_dense_stream_equals_the_cached_store(tmp_path, way, memory_gb):
    if memory_gb == "smallest":
        memory_gb = smallest_memory_gb(tmp_path)
    extraction, train, queries, gt = setup()
    want = cached_store(extraction, train, queries, gt, tmp_path / "cached.h5")
    report = streamed_store(extraction, train, queries, gt, tmp_path / "s.h5", memory_gb=memory_gb, ways=way)
    got = load_similarity(tmp_path / "s.h5")
    assert_same_numbers(got, want, rtol=1e-6 if way == FACTORED else 1e-9)
    np.testing.assert_allclose(got.scores(), want.scores(), atol=1e-9 if way == MATERIALISED else 1e-6)
    factorable = set(extraction.factorable())
    assert factorable and not any("norm" in n for n in factorable)  # RMSNorm weights are never factored
    assert got.component_way == [way if n in factorable else MATERIALISED for n in got.components]
    assert got.component_method == ["exact"] * len(got.components) and got.attrs["source"] == "stream"
    assert report.n_units == (1 if memory_gb == 1.0 else 2)  # at least one whole batch of 4 per chunk
    assert report.samples_computed == N_TRAIN + N_QUERY  # later passes read the training examples from disk
    assert list(tmp_path.iterdir()) and not list(tmp_path.glob(".*.spill"))


@pytest.mark.parametrize("way", [MATERIALISED, FACTORED])
def test_later_passes_read_the_training_examples_back_from_disk(tmp_path, monkeypatch, way):
    """Several passes (a batch of queries a chunk): with the training examples kept on disk and
    read back a component at a time (all of them in one product; a group's rows per product),
    without (turned off; too little disk free): the same norms bit for bit and the same dot
    products to float64 rounding (a product's sums round by the rows it multiplies); only the
    first pass runs the training examples through the model."""
    import tdabench.streaming as streaming

    memory_gb = smallest_memory_gb(tmp_path)
    extraction, train, queries, gt = setup()

    def run(name, budget=memory_gb, **kw):
        return streamed_store(extraction, train, queries, gt, tmp_path / f"{name}.h5", memory_gb=budget, ways=way, **kw)

    kept, off = run("kept"), run("off", spill=False)
    with monkeypatch.context() as m:  # products of at most one group's rows: several a component
        m.setattr(streaming.Streamer, "_held_bytes", lambda self, batch: 1.0)
        narrow = run("narrow")
    with monkeypatch.context() as m:  # every factorable component's queries held as factors (larger here)
        m.setattr(streaming.Streamer, "_formed_later", lambda self, q, b: self.extraction.factorable())
        later = run("later", 1.5 * memory_gb)
    monkeypatch.setattr(streaming, "fits", lambda directory, need: (False, 0.0))
    full = run("full")
    assert kept.n_units >= 2 and kept.spill_gb > 0 and narrow.spill_gb > 0 and off.spill_gb == full.spill_gb == 0
    assert narrow.train_group_rows < kept.train_group_rows == N_TRAIN  # several products a component
    assert kept.samples_computed == narrow.samples_computed == later.samples_computed == N_TRAIN + N_QUERY
    assert later.n_units >= 2
    assert off.samples_computed == full.samples_computed == kept.n_units * N_TRAIN + N_QUERY
    want = load_similarity(tmp_path / "off.h5")
    for name in ("kept", "narrow", "later", "full"):
        got = load_similarity(tmp_path / f"{name}.h5")
        for field in ("query_sqnorm", "train_sqnorm"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        assert_same_numbers(got, want, rtol=1e-12)
    assert not list(tmp_path.glob(".*.spill"))  # removed when the job ends


def test_training_examples_held_as_factors_in_groups_give_the_cached_store(tmp_path):
    """A model wide enough that a batch's factors take under half its formed gradients: the dense
    pass holds its training examples as factors, several batches at a time, and forms each
    component for the whole group (one wider product with the held queries)."""
    model = tiny_llama(hidden=128, intermediate=256)
    extraction = Extraction(model, ExtractionConfig(("q", "v", "down", "norm"), 2, None, 0, None))
    train, queries = examples(N_TRAIN, 1), examples(N_QUERY, 2)
    gt = np.random.default_rng(3).integers(0, N_TRAIN, N_QUERY)
    want = cached_store(extraction, train, queries, gt, tmp_path / "cached.h5")
    report = streamed_store(extraction, train, queries, gt, tmp_path / "s.h5", ways=MATERIALISED)
    assert report.train_group_rows >= 4  # two batches of 2 or more a group
    assert_same_numbers(load_similarity(tmp_path / "s.h5"), want, rtol=1e-9)
    mixed = streamed_store(extraction, train, queries, gt, tmp_path / "f.h5", ways=FACTORED)  # factors kept as such
    assert mixed.train_group_rows == report.train_group_rows
    assert_same_numbers(load_similarity(tmp_path / "f.h5"), want, rtol=1e-6)


def test_candidate_stream_equals_the_cached_store_and_sketches_are_recorded(tmp_path):
    extraction, train, queries, gt = setup(cap=100)
    cand = candidates_of(gt)
    want = cached_store(extraction, train, queries, gt, tmp_path / "cached.h5", candidates=cand)
    through_model, lengths = [], []  # rows of every batch the model computes gradients for; their lengths
    represent = extraction.represent

    def watched(batch, **kw):
        through_model.append(len(batch["input_ids"]))
        lengths.extend(batch["attention_mask"].sum(1).tolist())
        return represent(batch, **kw)

    extraction.represent = watched
    try:
        report = streamed_store(extraction, train, queries, gt, tmp_path / "s.h5", "candidates", cand)
    finally:
        extraction.represent = represent
    # One unit holds every query: each distinct candidate is computed once, however many hold it
    assert report.n_units == 1 and sum(through_model) == N_QUERY + len(np.unique(cand)) < N_QUERY * (1 + B)
    # ... the queries, then the candidates, each shortest first (batches with little padding)
    assert lengths[:N_QUERY] == sorted(len(q.input_ids) for q in queries) != [len(q.input_ids) for q in queries]
    assert lengths[N_QUERY:] == sorted(len(train[t].input_ids) for t in np.unique(cand))
    assert report.samples_computed == sum(through_model)
    got = load_similarity(tmp_path / "s.h5")
    np.testing.assert_array_equal(got.candidates, cand)
    np.testing.assert_allclose(got.dot, want.dot, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(got.query_sqnorm, want.query_sqnorm, rtol=1e-6)
    used = np.unique(cand)  # candidate layout: norms of training examples no query needs stay 0
    np.testing.assert_allclose(got.train_sqnorm[:, used], want.train_sqnorm[:, used], rtol=1e-6)
    assert (got.train_sqnorm[:, np.setdiff1d(np.arange(N_TRAIN), used)] == 0).all()
    np.testing.assert_allclose(got.scores(), want.scores(), atol=1e-6)
    sketched = set(extraction.sketch_info)
    assert sketched and got.component_method == ["countsketch" if n in sketched else "exact" for n in got.components]
    assert "countsketch 100" in got.provenance()


def test_candidate_batches_formed_one_component_at_a_time_equal_those_formed_in_the_pass(tmp_path, monkeypatch):
    """On the host a candidate batch's materialised components come back as factors and are formed
    one at a time: the store is bit for bit the one whose batches were formed in the pass."""
    import tdabench.streaming as S

    extraction, train, queries, gt = setup(cap=200)  # k and v exact, the rest sketched (never factors)
    cand = candidates_of(gt)
    asked = []  # the components each candidate batch was asked to return as factors
    real = S.Streamer.represent

    def recording(self, examples, reuse=False, factored=None):
        asked.append(None if factored is None else set(factored))
        return real(self, examples, reuse=reuse, factored=factored)

    monkeypatch.setattr(S.Streamer, "represent", recording)
    streamed_store(extraction, train, queries, gt, tmp_path / "later.h5", "candidates", cand, ways=MATERIALISED)
    factorable = set(extraction.factorable())
    assert factorable and set(extraction.sketch_info) and asked.count(factorable) == 1  # the one unit's batches

    def in_the_pass(self, examples, reuse=False, factored=None):  # every batch formed in the pass
        return real(self, examples, reuse=reuse)

    monkeypatch.setattr(S.Streamer, "represent", in_the_pass)
    streamed_store(extraction, train, queries, gt, tmp_path / "pass.h5", "candidates", cand, ways=MATERIALISED)
    got, want = load_similarity(tmp_path / "later.h5"), load_similarity(tmp_path / "pass.h5")
    for name in ("dot", "query_sqnorm", "train_sqnorm"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("layout", ["dense", "candidates"])
def test_shards_merge_to_the_unsharded_store(tmp_path, layout):
    extraction, train, queries, gt = setup()
    cand = candidates_of(gt) if layout == "candidates" else None
    streamed_store(extraction, train, queries, gt, tmp_path / "whole.h5", layout, cand)
    parts = [tmp_path / f"part-{i}.h5" for i in range(3)]
    for i, p in enumerate(parts):
        streamed_store(extraction, train, queries, gt, p, layout, cand, shard=i, shards=3)
    merged = merge_similarity(parts, tmp_path / "merged.h5")
    whole = load_similarity(tmp_path / "whole.h5")
    # Shards batch other samples together than the whole run, so float32 gradients may differ in
    # the last bits; the sum itself adds only zeros.
    assert_same_numbers(load_similarity(tmp_path / "merged.h5"), whole, rtol=1e-5)
    assert merged.attrs["n_shards"] == 3
    for i, p in enumerate(parts):  # each part holds only its own training columns
        part, rows = load_similarity(p), shard_rows(N_TRAIN, i, 3)
        outside = np.setdiff1d(np.arange(N_TRAIN), np.arange(N_TRAIN)[rows])
        assert (part.train_sqnorm[:, outside] == 0).all()
        if layout == "dense":
            assert (part.dot[:, :, outside] == 0).all() and (part.dot[:, :, rows] != 0).any()
        assert (part.query_sqnorm == 0).all() == (i > 0)


KILL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import numpy as np
import test_streaming as t
import tdabench.streaming as s
calls = {{"n": 0}}
real = s.SimilarityWriter.write
def write(self, unit, *a, **k):
    if calls["n"] == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 between two writes
    calls["n"] += 1
    real(self, unit, *a, **k)
s.SimilarityWriter.write = write
def run(path):  # both settings' stores from one pass
    extraction, train, queries, gt = t.setup()
    cand = t.candidates_of(gt) if {layout!r} == "candidates" else None
    paths = {{name: f"{{path}}-{{name}}.h5" for name in t.SETTINGS}}
    return t.settings_stores(extraction, train, queries, gt, paths, {layout!r}, cand, memory_gb={memory_gb})
r = run({path!r})
print("resumed", r.units_resumed, "of", r.n_units)
if {straight!r}:  # then the uninterrupted run, in this process too (the same thread count)
    run({straight!r})
"""


@pytest.mark.parametrize("layout", ["dense", "candidates"])
@pytest.mark.slow
def test_a_killed_pass_resumes_to_the_same_file_contents(tmp_path, layout):
    """Two settings' stores from one pass, killed (-9) between the two stores' writes of one unit:
    the rerun redoes that unit for the store that lacks it and ends with the files of a run that
    was never killed."""
    cand = candidates_of(setup()[3]) if layout == "candidates" else None
    memory_gb = smallest_memory_gb(tmp_path, layout, cand)  # one batch (query) per unit: several units
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    tests = os.path.dirname(__file__)
    # The uninterrupted run in a fresh process too (after the resumed one): this one's torch thread
    # count may have been changed by other tests, and float32 kernels round by thread count.
    args = {"tests": tests, "path": str(tmp_path / "resumed"), "layout": layout, "memory_gb": memory_gb}
    names = [f"-{n}.h5" for n in SETTINGS]
    # killed after unit 0 of both stores and unit 1 of the first
    script = KILL.format(**args, kill_after=3, straight="")
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for n in names:
        assert not (tmp_path / f"resumed{n}").exists() and (tmp_path / f".resumed{n}.partial").exists()
    left = sorted(p.name for p in tmp_path.glob(".*.spill"))  # the training examples kept on disk
    assert left == ([f".resumed{names[0]}.spill"] if layout == "dense" else [])
    script = KILL.format(**args, kill_after=-1, straight=str(tmp_path / "straight"))
    resumed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed 1 of" in resumed.stdout  # units done in both stores; the half-done one is redone
    for n in names:
        a, b = load_similarity(tmp_path / f"resumed{n}"), load_similarity(tmp_path / f"straight{n}")
        for name in ("dot", "query_sqnorm", "train_sqnorm"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert a.query_ids == b.query_ids and not (tmp_path / f".resumed{n}.partial").exists()
    assert not list(tmp_path.glob(".*.spill"))


@pytest.mark.parametrize("layout", ["dense", "candidates"])
def test_one_pass_writes_each_settings_store_as_its_own_pass_would(tmp_path, layout):
    """Two settings in one pass: each store is the one a pass of its own writes (dense: bit for
    bit), while the training examples go through the model once for both instead of once per
    setting."""
    extraction, train, queries, gt = setup()
    cand = candidates_of(gt) if layout == "candidates" else None
    paths = {s: tmp_path / f"{s}.h5" for s in SETTINGS}
    both = settings_stores(extraction, train, queries, gt, paths, layout, cand)
    ids, train_ids = [f"queries{i}" for i in range(N_QUERY)], [f"train{i}" for i in range(N_TRAIN)]
    alone_computed = 0
    for s, rows in SETTINGS.items():
        producer = StreamProducer(extraction, 0, StreamSpec(layout, 1.0), queries, train, ids)
        c = None if cand is None else cand[rows]
        target = Target([ids[r] for r in rows], train_ids, gt[rows], c, {"setting": s})
        alone_computed += producer.write(tmp_path / f"{s}-alone.h5", target).samples_computed
        got, want = load_similarity(paths[s]), load_similarity(tmp_path / f"{s}-alone.h5")
        assert got.query_ids == want.query_ids == [ids[r] for r in rows] and got.attrs["setting"] == s
        assert got.component_way == want.component_way
        if layout == "dense":  # the same batches of the query table and of the training examples
            for name in ("dot", "query_sqnorm", "train_sqnorm"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        else:  # a candidate is batched with the other candidates of its unit: float32 last bits
            np.testing.assert_array_equal(got.candidates, want.candidates)
            assert_same_numbers(got, want, rtol=1e-6)
            assert ((got.train_sqnorm == 0) == (want.train_sqnorm == 0)).all()  # only its own candidates' norms
    assert both.n_units == 1 and both.samples_computed < alone_computed


def test_units_group_queries_that_share_candidates():
    """Against every way of cutting 6 queries into units of 2, on 20 seeded cases: the grouping
    computes no more candidates than the contiguous cut there, and finds the best cut when queries
    come in twins (the published protocol: both settings query one prompt, so their BM25 sets
    are equal)."""
    from itertools import permutations

    from tdabench.streaming import group_queries

    def cost(units, cand):  # candidates computed: the distinct ones of each unit, summed
        return sum(len(np.unique(cand[u])) for u in units)

    g = np.random.default_rng(0)
    for trial in range(20):
        base = np.stack([g.choice(12, 3, replace=False) for _ in range(3)])
        cand = (
            base[g.permutation([0, 1, 2, 0, 1, 2])]
            if trial % 2
            else np.stack([g.choice(12, 3, replace=False) for _ in range(6)])
        )
        mine = np.ones_like(cand, dtype=bool)
        units = group_queries(cand, mine, 2)
        assert sorted(np.concatenate(units).tolist()) == list(range(6))
        assert all(len(u) <= 2 and (np.diff(u) > 0).all() for u in units)
        best = min(cost([list(p[i : i + 2]) for i in range(0, 6, 2)], cand) for p in permutations(range(6)))
        contiguous = cost([[0, 1], [2, 3], [4, 5]], cand)
        assert best <= cost(units, cand) <= contiguous
        if trial % 2:  # twins: each unit one twin pair
            assert cost(units, cand) == best == 9
    assert [u.tolist() for u in group_queries(cand, mine, 6)] == [list(range(6))]
    # candidates outside the shard do not count: with none in it, queries stay in order
    assert [u.tolist() for u in group_queries(cand, np.zeros_like(mine), 4)] == [[0, 1, 2, 3], [4, 5]]


def test_queries_move_to_units_with_room_where_they_add_fewer_candidates(monkeypatch):
    """7 queries in units of 3 leave room in the last unit: after the greedy grouping, moving
    queries there never computes more candidates than the greedy alone, lowers the count in some
    of 30 seeded cases, and never goes below the best of all 3^7 assignments (brute force)."""
    from itertools import product

    import tdabench.streaming as streaming

    def cost(units, cand):
        return sum(len(np.unique(cand[u])) for u in units)

    g, lowered = np.random.default_rng(3), 0
    greedy_only = lambda units, incidence, per_unit: units  # noqa: E731
    for _ in range(30):
        cand = np.stack([g.choice(10, 3, replace=False) for _ in range(7)])
        mine = np.ones_like(cand, dtype=bool)
        units = streaming.group_queries(cand, mine, 3)
        assert sorted(np.concatenate(units).tolist()) == list(range(7))
        assert all(0 < len(u) <= 3 and (np.diff(u) > 0).all() for u in units)
        with monkeypatch.context() as m:
            m.setattr(streaming, "_move_queries", greedy_only)
            greedy = streaming.group_queries(cand, mine, 3)
        best = min(
            cost([[q for q in range(7) if at[q] == k] for k in range(3)], cand)
            for at in product(range(3), repeat=7)
            if max(np.bincount(at, minlength=3)) <= 3
        )
        assert best <= cost(units, cand) <= cost(greedy, cand)
        lowered += cost(units, cand) < cost(greedy, cand)
    assert lowered > 0


def test_twin_queries_of_two_settings_share_their_units(tmp_path):
    """Setting b's queries repeat setting a's prompts' candidate sets (as both settings query one
    paraphrased prompt): with room for two queries a unit, each unit holds a twin pair and
    computes its candidates once; the stores equal a pass per setting."""
    extraction, train, queries, gt = setup()
    cand = candidates_of(gt)
    a, b = SETTINGS["a"][:3], SETTINGS["b"]  # 3 twin pairs: b[i] takes a[i]'s candidates
    cand[b] = cand[a]
    rows = np.sort(np.concatenate([a, b]))
    one = smallest_memory_gb(tmp_path, "candidates", cand) * 1.0001
    ids, train_ids = [f"queries{i}" for i in range(N_QUERY)], [f"train{i}" for i in range(N_TRAIN)]
    producer = StreamProducer(extraction, 0, StreamSpec("candidates", 2 * one), queries, train, ids)
    targets = [
        Target([ids[r] for r in r_], train_ids, gt[r_], cand[r_], {"setting": s}) for s, r_ in (("a", a), ("b", b))
    ]
    report = producer.write_all([tmp_path / "a.h5", tmp_path / "b.h5"], targets)
    assert report.n_units == 3
    assert report.samples_computed == len(rows) + sum(len(np.unique(cand[[x, y]])) for x, y in zip(a, b))
    for s, r_ in (("a", a), ("b", b)):
        alone = StreamProducer(extraction, 0, StreamSpec("candidates", 1.0), queries, train, ids)
        alone.write(
            tmp_path / f"{s}-alone.h5", Target([ids[r] for r in r_], train_ids, gt[r_], cand[r_], {"setting": s})
        )
        assert_same_numbers(
            load_similarity(tmp_path / f"{s}.h5"), load_similarity(tmp_path / f"{s}-alone.h5"), rtol=1e-6
        )


def test_factored_components_come_back_as_inputs_and_output_gradients():
    extraction, train, queries, gt = setup()
    batch = next(iter(extraction.batches(train, 0)))[1]
    names = extraction.factorable()
    formed = extraction(batch)
    factored = extraction.represent(batch, factored=names)
    shapes = {c.name: c.shape for c in component_registry(extraction.model)}
    for n in extraction.names:
        if n in names:  # g[s]^T x[s] is the per-sample gradient
            f = factored[n]
            grad = torch.einsum("sto,sti->soi", f.g, f.x).reshape(len(f.g), -1)
            assert tuple(f.x.shape[2:]) == (shapes[n][1],)
            torch.testing.assert_close(grad, formed[n], rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(factored[n].tensor, formed[n])
    with pytest.raises(ValueError, match="cannot be returned factored"):
        extraction.represent(batch, factored=["model.norm.weight"])


def test_a_settings_queries_streamed_from_the_whole_table_match_the_cached_store(tmp_path):
    """The default study's case: the cache batched every query, the store holds one setting's.
    Batching as the gradients job did gives the same per-sample gradients: cosines to 1e-9."""
    extraction, train, queries, gt = setup()
    rows = np.array([2, 3, 4, 6])
    want_all = cached_store(extraction, train, queries, gt, tmp_path / "cached.h5")
    with GradientStore(tmp_path / "train.h5") as t, GradientStore(tmp_path / "queries.h5") as q:
        ids = [f"queries{i}" for i in rows]
        build_similarity(t, q, ids, [f"train{i}" for i in gt[rows]], tmp_path / "subset.h5", "s")
    want = load_similarity(tmp_path / "subset.h5")
    ids = [f"queries{i}" for i in range(N_QUERY)]
    producer = StreamProducer(extraction, 0, StreamSpec("dense", 1.0), queries, train, ids)
    target = Target([f"queries{i}" for i in rows], [f"train{i}" for i in range(N_TRAIN)], gt[rows])
    producer.write(tmp_path / "s.h5", target)
    got = load_similarity(tmp_path / "s.h5")
    assert got.query_ids == want.query_ids
    assert_same_numbers(got, want, rtol=1e-9)
    np.testing.assert_allclose(got.scores(), want.scores(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(want.dot, want_all.dot[:, rows], rtol=1e-12, atol=1e-20)


@pytest.mark.parametrize("layout", ["dense", "candidates"])
def test_a_budget_below_one_unit_names_the_key_and_the_smallest_value_that_works(tmp_path, layout):
    extraction, train, queries, gt = setup()
    cand = candidates_of(gt) if layout == "candidates" else None
    smallest = smallest_memory_gb(tmp_path, layout, cand)  # refused below it, nothing written
    report = streamed_store(extraction, train, queries, gt, tmp_path / "s.h5", layout, cand, memory_gb=smallest)
    assert report.n_units > 1  # it holds one unit at a time
    with pytest.raises(ConfigError, match="similarity.memory_gb"):
        streamed_store(extraction, train, queries, gt, tmp_path / "t.h5", layout, cand, memory_gb=smallest / 2)


def test_candidate_units_are_sized_in_the_ways_they_are_held(tmp_path):
    """A budget below one query's materialised gradient but above its factored form runs factored
    (the published profile on a 1 B model: 4.7 GB a query materialised, memory_gb 4)."""
    extraction, train, queries, gt = setup()
    cand = candidates_of(gt)
    factored = smallest_memory_gb(tmp_path, "candidates", cand, ways=FACTORED)
    assert factored < smallest_memory_gb(tmp_path, "candidates", cand, ways=MATERIALISED)
    report = streamed_store(
        extraction, train, queries, gt, tmp_path / "s.h5", "candidates", cand, memory_gb=factored, ways=FACTORED
    )
    assert report.n_units == N_QUERY  # one query a unit
    want = cached_store(extraction, train, queries, gt, tmp_path / "cached.h5", candidates=cand)
    np.testing.assert_allclose(load_similarity(tmp_path / "s.h5").scores(), want.scores(), atol=1e-6)


def test_more_shards_than_training_examples_is_refused_before_writing(tmp_path):
    extraction, train, queries, gt = setup()
    with pytest.raises(ValueError, match="similarity.shards"):
        streamed_store(extraction, train[:2], queries, gt % 2, tmp_path / "s.h5", shard=0, shards=3)
    assert not list(tmp_path.iterdir())


class Bar:
    """A progress bar that records where it stands after each update."""

    def __init__(self):
        self.total, self.counts = None, [0]

    def set_total(self, total):
        self.total = total

    def update(self, n=1):
        self.counts.append(self.counts[-1] + n)


@pytest.mark.parametrize("spill", [True, False])
@pytest.mark.parametrize("units", ["one", "several"])
def test_the_dense_pass_moves_its_bar_a_step_at_a_time_to_its_total(tmp_path, spill, units):
    """Each training batch through the model, query batch held and component multiplied is one
    step (a pass of one unit, as the SmolLM2 study's, shows progress too), counted exactly: every
    update is one step, and the last reaches the total."""
    extraction, train, queries, gt = setup()
    memory_gb = 1.0 if units == "one" else smallest_memory_gb(tmp_path)
    producer = StreamProducer(extraction, 0, StreamSpec("dense", memory_gb, spill=spill), queries, train)
    target = Target([f"q{i}" for i in range(N_QUERY)], [f"t{i}" for i in range(N_TRAIN)], gt, None, {"setting": "s"})
    bar = Bar()
    report = producer.write(tmp_path / "s.h5", target, bar)
    assert (report.n_units == 1) == (units == "one")
    steps = np.diff(bar.counts)
    assert bar.counts[-1] == bar.total and (steps == 1).all(), (bar.total, bar.counts)
    batches = -(-N_TRAIN // 4), -(-N_QUERY // 4)  # training and query batches of 4
    model = batches[0] * (1 if spill and report.spill_gb > 0 else report.n_units) + batches[1]
    assert bar.total >= model + report.n_units * len(extraction.names)


def test_shortest_first_orders_by_length_keeping_ties_and_places_each_example():
    lengths = [5, 2, 5, 3, 2]
    order, place = shortest_first([Encoded([1] * n, [1] * n, 0, False) for n in lengths])
    assert [lengths[i] for i in order] == sorted(lengths)
    assert order.tolist() == [1, 4, 3, 0, 2]  # equal lengths keep their order
    assert (order[place] == np.arange(len(lengths))).all()
