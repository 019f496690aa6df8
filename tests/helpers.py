"""Small builders shared by tests."""

import numpy as np

from tdabench.components import describe
from tdabench.store import GradientStoreWriter


def random_store(path, ids, dims, seed=0, n_per_batch=3, attrs=None):
    """A gradient store with random rows; returns {component: [n, d] float32}."""
    rng = np.random.default_rng(seed)
    comps = [describe(f"model.layers.{i}.mlp.down_proj.weight", (d,)) for i, d in enumerate(dims)]
    data = {c.name: rng.standard_normal((len(ids), c.numel)).astype(np.float32) for c in comps}
    with GradientStoreWriter(path, ids, comps, "float32", {"model_fingerprint": "test", **(attrs or {})}) as w:
        for start in range(0, len(ids), n_per_batch):
            rows = slice(start, min(start + n_per_batch, len(ids)))
            w.write(rows, {n: v[rows] for n, v in data.items()})
    return data


def crash_writer(path, crash_after=None, attrs=None, keep_partial=False):
    """Write 18 rows in 6 batches; `os._exit(17)` after `crash_after` batches (a killed job).

    Returns how many batches it computed (skipping rows a partial file already has done).
    """
    import os
    from pathlib import Path

    ids = [f"s{i:02d}" for i in range(18)]
    comps = [describe("model.layers.0.mlp.up_proj.weight", (5, 4)), describe("lm_head.weight", (7,))]
    rng = np.random.default_rng(0)
    data = {c.name: rng.standard_normal((18, c.numel)).astype(np.float32) for c in comps}
    computed = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with GradientStoreWriter(path, ids, comps, attrs={"model_fingerprint": "x", **(attrs or {})}) as w:
            for b, start in enumerate(range(0, 18, 3)):
                if crash_after is not None and b == crash_after:
                    os._exit(17)
                rows = slice(start, start + 3)
                if w.done[rows].all():
                    continue
                w.write(rows, {n: v[rows] for n, v in data.items()})
                computed += 1
                if keep_partial and b == 2:
                    raise InterruptedError
    except InterruptedError:
        pass
    return computed
