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
