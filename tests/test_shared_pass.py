"""Projections taken from a streamed similarity pass (`InPass`) against their own pass over the
model (`project_from_model`): the same gradients, projected in one group, so count sketches bit for
bit and drawn blocks to float32 rounding (a product rounds by the rows it multiplies); the
similarity store is the one the pass writes without a tap."""

import numpy as np
import pytest
from test_projection_stream import COMPONENTS, model

import tdabench.streaming as streaming
from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.factored import FACTORED, MATERIALISED
from tdabench.producer import Target
from tdabench.projection import ProjectionConfig, method_config
from tdabench.projection_stream import InPass, Plan, Projections, project_from_model
from tdabench.similarity import load_similarity
from tdabench.streaming import StreamProducer, StreamSpec

from test_streaming import assert_same_numbers, examples

N_TRAIN, N_QUERY = 11, 7


def stream(extraction, train, queries, path, memory_gb, tap=None, spill=True):
    producer = StreamProducer(extraction, 0, StreamSpec("dense", memory_gb, spill=spill), queries, train)
    gt = np.arange(N_QUERY) % N_TRAIN
    target = Target([f"q{i}" for i in range(N_QUERY)], [f"t{i}" for i in range(N_TRAIN)], gt, None, {"setting": "s"})
    return producer.write_all([path], [target], tap=tap)


@pytest.mark.parametrize("way", [MATERIALISED, FACTORED])
def test_projections_taken_from_the_similarity_pass_equal_their_own_pass(tmp_path, monkeypatch, way):
    """Planned materialised (training examples formed at once from disk) or factored (handed over
    batch by batch as factors, formed by the tap): every kind, a selection, kept blocks."""
    monkeypatch.setattr(
        streaming, "plan_ways", lambda ex, t, p: {n: (way if n in ex.factorable() else MATERIALISED) for n in ex.names}
    )
    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 4, None, 0, None))
    train, queries = examples(N_TRAIN, 1), examples(N_QUERY, 2)
    names = tuple(extraction.names)
    plans = [Plan(method_config(m, k, 0, 2), names) for m in ("sjlt", "gaussian", "blockwise") for k in (8, 64)]
    plans += [Plan(ProjectionConfig("sjlt", 16, 1, 1), names, parts=True)]  # a kept one
    plans += [Plan(method_config("sjlt", 8, 2), names[1:3])]  # a selection
    dims = dict(zip(names, extraction.stored_dims))
    kept = {}
    projections = Projections(plans, names, dims, N_TRAIN + N_QUERY, lambda i, n, first, y, s: kept.setdefault(n, y))
    tap = InPass(projections, extraction, N_TRAIN, N_QUERY)
    report = stream(extraction, train, queries, tmp_path / "tapped.h5", 1.0, tap)
    assert report.tapped and tap.complete and report.n_units == 1
    assert report.samples_computed == N_TRAIN + N_QUERY  # the projections took no pass of their own
    want, _ = project_from_model(extraction, 0, [train, queries], plans, 1.0)
    for plan, got, w in zip(plans, projections.outs, want):
        assert got.shape == w.shape and np.abs(w).max() > 0
        if plan.cfg.kind == "sjlt":
            np.testing.assert_array_equal(got, w)
        else:
            assert np.abs(got - w).max() <= 1e-5 * np.abs(w).max(), plan.cfg
    assert sorted(kept) == sorted(names) and all(y.shape == (N_TRAIN + N_QUERY, 16) for y in kept.values())
    stream(extraction, train, queries, tmp_path / "plain.h5", 1.0)
    got, plain = load_similarity(tmp_path / "tapped.h5"), load_similarity(tmp_path / "plain.h5")
    for field in ("query_sqnorm", "train_sqnorm"):
        np.testing.assert_array_equal(getattr(got, field), getattr(plain, field))
    assert_same_numbers(got, plain, rtol=1e-12)


def test_a_pass_that_cannot_hand_every_sample_over_takes_no_tap(tmp_path):
    """Several units (one batch of queries a chunk), or no disk path: the tap is left untouched,
    and the job projects in a pass of its own (tdabench.pipeline.shared_stream)."""
    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 4, None, 0, None))
    train, queries = examples(N_TRAIN, 1), examples(N_QUERY, 2)
    names = tuple(extraction.names)
    dims = dict(zip(names, extraction.stored_dims))

    def tap():
        projections = Projections([Plan(method_config("sjlt", 8, 0), names)], names, dims, N_TRAIN + N_QUERY)
        return InPass(projections, extraction, N_TRAIN, N_QUERY)

    for path, budget, spill in (("chunks.h5", 3e-4, True), ("off.h5", 1.0, False)):
        t = tap()
        report = stream(extraction, train, queries, tmp_path / path, budget, t, spill)
        assert not report.tapped and not t.done and not np.any(t.projections.outs[0])
        assert report.n_units >= 2 if spill else report.spill_gb == 0


KILL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import numpy as np
import test_shared_pass as t
from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.projection import method_config
from tdabench.projection_stream import InPass, Plan, Projections
calls = {{"n": 0}}
real = InPass.queries
def queries(self, name, rep):
    if calls["n"] == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-pass, a few components projected
    calls["n"] += 1
    real(self, name, rep)
InPass.queries = queries
def run(path):
    extraction = Extraction(t.model(), ExtractionConfig(t.COMPONENTS, 4, None, 0, None))
    train, queries_ = t.examples(t.N_TRAIN, 1), t.examples(t.N_QUERY, 2)
    names = tuple(extraction.names)
    plans = [Plan(method_config(m, 16, 0), names) for m in ("sjlt", "blockwise")]
    dims = dict(zip(names, extraction.stored_dims))
    projections = Projections(plans, names, dims, t.N_TRAIN + t.N_QUERY)
    tap = InPass(projections, extraction, t.N_TRAIN, t.N_QUERY)
    report = t.stream(extraction, train, queries_, path + ".h5", 1.0, tap)
    assert report.tapped and tap.complete
    np.savez(path + ".npz", *projections.outs)
run({path!r})
if {straight!r}:  # the uninterrupted run, in this process too (the same thread count)
    run({straight!r})
"""


@pytest.mark.slow
def test_a_pass_killed_while_projecting_reruns_to_the_same_files(tmp_path):
    """kill -9 mid-pass, after some components were projected: nothing is left that a rerun
    would trust (the store is a partial file, the projections were never written), and the rerun
    writes the store and the projections of a run that was never killed, bit for bit."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = {"tests": os.path.dirname(__file__), "path": str(tmp_path / "rerun")}
    killed = subprocess.run(
        [sys.executable, "-c", KILL.format(**args, kill_after=2, straight="")], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "rerun.h5").exists() and not (tmp_path / "rerun.npz").exists()
    assert (tmp_path / ".rerun.h5.partial").exists()
    script = KILL.format(**args, kill_after=-1, straight=str(tmp_path / "straight"))
    rerun = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    got, want = np.load(tmp_path / "rerun.npz"), np.load(tmp_path / "straight.npz")
    assert len(want.files) == 2
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name])
    a, b = load_similarity(tmp_path / "rerun.h5"), load_similarity(tmp_path / "straight.h5")
    for name in ("dot", "query_sqnorm", "train_sqnorm"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not list(tmp_path.glob(".*.spill")) and not (tmp_path / ".rerun.h5.partial").exists()
