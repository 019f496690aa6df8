"""Projections straight from the model against `project_store` on a cache of the same gradients:
every kind, full gradient and a selection, held factored or formed, in groups of any size."""

import numpy as np
import pytest

from tdabench.config import ConfigError
from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.projection import ProjectionConfig, method_config, project_store
from tdabench.projection_stream import Plan, held_factored, padded_tokens, project_from_model
from tdabench.store import GradientStore, GradientStoreWriter

from helpers import tiny_llama
from test_streaming import VOCAB, examples

COMPONENTS = ("q", "v", "down", "lm_head", "norm")  # linear weights, the head, RMSNorm (vmap)


def model():
    """Wide enough that the linear layers' factors (<= 16 tokens) are smaller than their gradients."""
    return tiny_llama(hidden=64, intermediate=96)


METHODS = ("sjlt", "gaussian", "rademacher", "blockwise", "blockwise_unnormalized", "paper")


def cached(extraction, parts, path):
    """One gradient store of all samples, batched per part as the stream batches them."""
    n = sum(len(p) for p in parts)
    with GradientStoreWriter(
        path, [f"s{i}" for i in range(n)], extraction.components, "float32", {}, extraction.sketch_info
    ) as w:
        offset = 0
        for part in parts:
            for rows, batch in extraction.batches(part, 0):
                grads = {k: g.numpy() for k, g in extraction(batch).items()}
                w.write(slice(offset + rows.start, offset + rows.stop), grads)
            offset += len(part)
    return GradientStore(path)


def plans(names, selected):
    out = [Plan(method_config(m, k, s, nonzeros=2), tuple(names)) for m in METHODS for k in (16, 64) for s in (0, 1)]
    out += [Plan(ProjectionConfig(kind, 8, 3, 1), tuple(selected)) for kind in ("sjlt", "gaussian")]
    return out


@pytest.mark.parametrize("cap, memory_gb", [(None, 1.0), (None, 2e-4), (300, 1e-4)])
def test_streamed_projections_are_the_cached_ones(tmp_path, monkeypatch, cap, memory_gb):
    """Budgets: one group; a group a batch (factors formed per batch); count-sketched components.
    One group, each block in a product of its own: bit for bit."""
    import tdabench.projection as P

    if memory_gb == 1.0:
        monkeypatch.setattr(P, "FUSED_COLUMNS", 1)  # (narrow blocks sharing a product round as it rounds)
    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 4, cap, 0, None))
    parts = [examples(11, 1), examples(7, 2)]
    names = extraction.names
    selected = [names[3], names[1]]  # out of order: indices are the store's, not the selection's
    todo = plans(names, selected)
    got, report = project_from_model(extraction, 0, parts, todo, memory_gb)
    if memory_gb == 1.0:
        assert report.groups == 1
    else:
        assert report.groups >= 2
    with cached(extraction, parts, tmp_path / "g.h5") as store:
        for plan, out in zip(todo, got):
            subset = None if len(plan.components) == len(names) else list(plan.components)
            want = project_store(store, plan.cfg, components=subset)
            assert out.shape == want.shape
            if report.groups == 1:  # the same rows in every product: the same bits
                np.testing.assert_array_equal(out, want, err_msg=str(plan.cfg))
            else:  # a product's rounding depends on how many rows and columns it multiplies at once
                np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=str(plan.cfg))


def test_groups_hold_as_many_samples_as_their_batches_lengths_allow(tmp_path):
    """The budget is spent on what each batch holds at its own padded length: short batches fill
    a group with more samples than the longest sample's size would allow."""
    from tdabench.models import Encoded
    from tdabench.projection_stream import sample_bytes

    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 2, None, 0, None))
    g = np.random.default_rng(5)
    short = [Encoded([int(t) for t in g.integers(1, VOCAB, 5)], [-100] + [1] * 4, 1, False) for _ in range(8)]
    long = [Encoded([int(t) for t in g.integers(1, VOCAB, 16)], [-100] + [1] * 15, 1, False) for _ in range(2)]
    parts = [short + long]
    names = extraction.names
    factored = held_factored(extraction, names, padded_tokens(long))
    widest = max(extraction.stored_dims)
    at_longest = sample_bytes(extraction, names, factored, padded_tokens(long)) + 4.0 * widest
    plan = [Plan(method_config("gaussian", 8, 0), tuple(names)), Plan(method_config("sjlt", 8, 0), tuple(names))]
    got, report = project_from_model(extraction, 0, parts, plan, 4.5 * at_longest / 1e9)  # 4 samples at the longest
    assert report.group_rows >= 6 and report.groups >= 2
    with cached(extraction, parts, tmp_path / "g.h5") as store:
        for p, out in zip(plan, got):
            want = project_store(store, p.cfg)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_linear_layers_are_held_as_factors_where_that_is_smaller():
    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 4, None, 0, None))
    tokens = padded_tokens(examples(11, 1))
    held = held_factored(extraction, extraction.names, tokens)
    shapes = {c.name: c.shape for c in extraction.components}
    assert held and all(tokens * sum(shapes[n]) < shapes[n][0] * shapes[n][1] for n in held)
    assert not any("norm" in n for n in held)  # a vector is never factorable
    assert held_factored(extraction, extraction.names, 10**6) == []  # long sequences: formed is smaller


def test_a_budget_below_one_sample_names_the_key_and_the_smallest_value():
    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 4, None, 0, None))
    plan = [Plan(method_config("sjlt", 8, 0), tuple(extraction.names))]
    with pytest.raises(ConfigError, match=r"similarity\.memory_gb: 1e-09 GB .* the smallest value that works is"):
        project_from_model(extraction, 0, [examples(3, 1)], plan, 1e-9)


KILL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_projection_stream import COMPONENTS, examples, model
from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.projection import method_config
from tdabench.projection_files import ProjectionWriter
from tdabench.projection_stream import Plan, project_from_model

class Progress:  # killed (-9) once the pass is past its first group
    seen = 0
    def update(self, n):
        self.seen += n
        if {kill!r} and self.seen > 8:
            os.kill(os.getpid(), signal.SIGKILL)

def run(path, progress):
    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 4, None, 0, None))
    parts = [examples(11, 1), examples(7, 2)]
    plans = [Plan(method_config(m, 16, 0), tuple(extraction.names)) for m in ("sjlt", "blockwise")]
    outs, _ = project_from_model(extraction, 0, parts, plans, 2e-4, progress)
    with ProjectionWriter(path, "mixed", [f"t{{i}}" for i in range(11)], [f"q{{i}}" for i in range(7)]) as w:
        for seed, out in enumerate(outs):
            w.add(16, seed, out[:11], out[11:], 0.0)

run({path!r}, Progress())
if {straight!r}:  # the uninterrupted run, in this process too (the same thread count)
    run({straight!r}, None)
"""


@pytest.mark.slow
def test_a_killed_projection_pass_leaves_nothing_and_its_rerun_gives_the_uninterrupted_files(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tdabench.projection_files import read_projections

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = {"tests": os.path.dirname(__file__), "path": str(tmp_path / "p.h5")}
    killed = subprocess.run(
        [sys.executable, "-c", KILL.format(**args, kill=True, straight="")], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "p.h5").exists() and not (tmp_path / ".p.h5.partial").exists()
    script = KILL.format(**args, kill=False, straight=str(tmp_path / "straight.h5"))
    rerun = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    ids = [f"q{i}" for i in range(7)]
    for a, b in zip(read_projections(tmp_path / "p.h5", ids), read_projections(tmp_path / "straight.h5", ids)):
        np.testing.assert_array_equal(a.train, b.train)
        np.testing.assert_array_equal(a.queries, b.queries)
