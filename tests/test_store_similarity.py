"""Gradient store round trip, atomic writes, shards; similarity store vs direct cosine."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from tdabench.cached import build_similarity
from tdabench.components import describe
from tdabench.similarity import load_similarity
from tdabench.store import GradientStore, GradientStoreWriter

from helpers import random_store

DIMS = [6, 3, 10]


def test_store_round_trip_and_shards_read_as_one(tmp_path):
    ids = [f"t{i}" for i in range(11)]
    a = random_store(tmp_path / "s0.h5", ids[:5], DIMS, seed=1)
    b = random_store(tmp_path / "s1.h5", ids[5:], DIMS, seed=2)
    with GradientStore([tmp_path / "s0.h5", tmp_path / "s1.h5"]) as store:
        assert store.sample_ids == ids
        for name in store.components:
            want = np.concatenate([a[name], b[name]])
            np.testing.assert_array_equal(store.read(name), want)
            blocks = np.concatenate([blk for _, blk in store.iter_blocks(name, 2)])
            np.testing.assert_array_equal(blocks, want)
            np.testing.assert_array_equal(store.read(name, np.array([7, 1])), want[[7, 1]])


def test_interrupted_write_leaves_only_a_partial_file(tmp_path):
    path = tmp_path / "g.h5"
    comps = [describe("lm_head.weight", (4,))]
    with pytest.raises(RuntimeError, match="never written"):
        with GradientStoreWriter(path, ["a", "b"], comps) as w:
            w.write(slice(0, 1), {"lm_head.weight": np.ones((1, 4))})  # row "b" missing
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt):
        with GradientStoreWriter(path, ["a", "b"], comps) as w:
            raise KeyboardInterrupt  # a job killed mid-way
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".g.h5.partial"]


CRASH = """
import os, sys
import numpy as np
sys.path.insert(0, {tests!r})
from helpers import crash_writer
crash_writer({path!r}, crash_after={n})
"""


@pytest.mark.slow  # a writer process killed mid-store
def test_resume_after_crash_gives_a_byte_identical_file(tmp_path):
    import subprocess
    import sys

    from helpers import crash_writer

    crash_writer(tmp_path / "ref" / "g.h5", crash_after=None)  # uninterrupted
    target = tmp_path / "run" / "g.h5"
    code = CRASH.format(tests=str(Path(__file__).parent), path=str(target), n=2)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 17  # killed after 2 batches
    partial = target.with_name(".g.h5.partial")
    assert partial.exists() and not target.exists()
    with h5py.File(partial, "r") as f:
        assert f["done"][:].sum() == 6  # two batches of 3 rows made it
    written = crash_writer(target, crash_after=None)  # the rerun resumes
    assert written == 4  # only the 4 batches still missing were computed
    assert target.read_bytes() == (tmp_path / "ref" / "g.h5").read_bytes()


def test_resume_ignores_partial_files_of_other_settings(tmp_path):
    from helpers import crash_writer

    target = tmp_path / "g.h5"
    crash_writer(target, crash_after=None, attrs={"config_hash": "old"}, keep_partial=True)
    assert crash_writer(target, crash_after=None, attrs={"config_hash": "new"}) == 6  # recomputed all


def test_incomplete_or_foreign_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["format"] = "something else"
    with pytest.raises(ValueError, match="not a tdabench gradient store"):
        GradientStore(tmp_path / "x.h5")


def direct_cosine(q, t):
    return q @ t / (np.linalg.norm(q) * np.linalg.norm(t))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_subset_cosine_from_similarity_store_equals_direct(tmp_path, dtype):
    train_ids = [f"t{i}" for i in range(9)]
    query_ids = [f"q{i}" for i in range(5)]
    train = random_store(tmp_path / "train.h5", train_ids, DIMS, seed=3)
    queries = random_store(tmp_path / "queries.h5", query_ids, DIMS, seed=4)
    sources = ["t4", "t0", "t8", "t4", "t2"]
    chosen_queries = ["q3", "q0", "q4"]
    chosen_sources = [sources[int(q[1])] for q in chosen_queries]
    with GradientStore(tmp_path / "train.h5") as ts, GradientStore(tmp_path / "queries.h5") as qs:
        build_similarity(
            ts, qs, chosen_queries, chosen_sources, tmp_path / "sim.h5", "paraphrased", block_rows=4, dtype=dtype
        )
    sim = load_similarity(tmp_path / "sim.h5")
    names = list(train)
    assert sim.query_ids == chosen_queries and sim.train_ids == train_ids
    assert sim.ground_truth.tolist() == [train_ids.index(s) for s in chosen_sources]
    tol = 1e-12 if dtype == "float64" else 1e-5
    for subset in ([0], [2], [0, 2], [1, 2], [0, 1, 2]):
        got = sim.scores(subset)
        for qi, q in enumerate(chosen_queries):
            qv = np.concatenate([queries[names[c]][int(q[1])] for c in subset]).astype(np.float64)
            for ti in range(len(train_ids)):
                tv = np.concatenate([train[names[c]][ti] for c in subset]).astype(np.float64)
                assert abs(got[qi, ti] - direct_cosine(qv, tv)) < tol


def test_a_failed_cache_similarity_job_leaves_no_file(tmp_path, monkeypatch):
    train = random_store(tmp_path / "train.h5", [f"t{i}" for i in range(9)], DIMS, seed=3)
    random_store(tmp_path / "queries.h5", ["q0", "q1"], DIMS, seed=4)
    real = GradientStore.iter_blocks

    def failing(self, component, block_rows):
        if component == list(train)[1]:  # the second component's read fails
            raise OSError("unreadable block")
        yield from real(self, component, block_rows)

    monkeypatch.setattr(GradientStore, "iter_blocks", failing)
    with GradientStore(tmp_path / "train.h5") as ts, GradientStore(tmp_path / "queries.h5") as qs:
        with pytest.raises(OSError, match="unreadable block"):
            build_similarity(ts, qs, ["q0", "q1"], ["t1", "t2"], tmp_path / "out" / "sim.h5", "s", block_rows=4)
    assert list((tmp_path / "out").iterdir()) == []  # no store, no partial file to resume
