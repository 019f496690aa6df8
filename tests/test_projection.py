"""Projections: one fixed matrix over the concatenated gradient, unbiased inner products."""

import numpy as np
import pytest
import torch

from helpers import random_store
from tdabench.projection import CHUNK, ProjectionConfig, project_component, project_store
from tdabench.store import GradientStore

DIMS = [7, 5, 12]


def explicit_matrix(cfg, dims):
    """P^T [D, k], assembled by projecting identity rows of each component block."""
    blocks = [project_component(torch.eye(d), c, cfg).numpy() for c, d in enumerate(dims)]
    return np.concatenate(blocks)


@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
def test_streamed_projection_equals_explicit_matrix(tmp_path, kind):
    data = random_store(tmp_path / "g.h5", [f"s{i}" for i in range(6)], DIMS, seed=0)
    cfg = ProjectionConfig(kind, k=4, seed=7, nonzeros=2)
    full = np.concatenate(list(data.values()), axis=1)  # [n, D] the concatenated gradients
    with GradientStore(tmp_path / "g.h5") as store:
        got = project_store(store, cfg, block_rows=4)
        sub = project_store(store, cfg, rows=np.array([4, 1]))
    want = full @ explicit_matrix(cfg, DIMS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sub, want[[4, 1]], rtol=1e-5, atol=1e-5)


def test_same_seed_same_matrix_other_seed_other_matrix():
    a = explicit_matrix(ProjectionConfig("gaussian", 8, seed=1), DIMS)
    b = explicit_matrix(ProjectionConfig("gaussian", 8, seed=1), DIMS)
    c = explicit_matrix(ProjectionConfig("gaussian", 8, seed=2), DIMS)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_sjlt_columns_have_one_signed_entry():
    m = explicit_matrix(ProjectionConfig("sjlt", 16, seed=0, nonzeros=1), DIMS)  # [D, k]
    assert ((m != 0).sum(1) == 1).all()
    assert set(np.abs(m[m != 0]).round(6)) == {1.0}


def test_gaussian_blocks_longer_than_a_chunk_are_consistent():
    cfg = ProjectionConfig("gaussian", 3, seed=0)
    x = torch.randn(2, CHUNK + 5)
    whole = project_component(x, 0, cfg)
    p = project_component(torch.eye(CHUNK + 5), 0, cfg)  # [D, k]
    torch.testing.assert_close(whole, x @ p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,nonzeros", [("gaussian", 1), ("sjlt", 1), ("sjlt", 4)])
def test_inner_products_are_unbiased_within_jl_bound(kind, nonzeros):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(40), rng.standard_normal(40)
    y += 0.5 * x
    k, n_seeds = 16, 600
    xy = torch.tensor(np.stack([x, y]), dtype=torch.float32)
    est = []
    for seed in range(n_seeds):
        p = project_component(xy, 0, ProjectionConfig(kind, k, seed, nonzeros)).numpy()
        est.append(p[0] @ p[1])
    true = x @ y
    # Var[<Px,Py>] <= (|x|^2 |y|^2 + <x,y>^2) * 2 / k for these sketches: 5 standard errors.
    bound = np.sqrt((x @ x * (y @ y) + true**2) * 2 / k / n_seeds)
    assert abs(np.mean(est) - true) < 5 * bound


def test_count_sketch_is_unbiased_within_jl_bound_and_exact_blockwise():
    from tdabench.projection import CountSketch

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(200), rng.standard_normal(200)
    y += 0.3 * x
    k, n_seeds = 32, 800
    est = []
    for seed in range(n_seeds):
        s = CountSketch(200, k, seed, key=5)
        sx, sy = s(torch.tensor(x[None], dtype=torch.float32)), s(torch.tensor(y[None], dtype=torch.float32))
        est.append(float(sx[0] @ sy[0]))
    true = x @ y
    bound = np.sqrt((x @ x * (y @ y) + true**2) / k / n_seeds)
    assert abs(np.mean(est) - true) < 5 * bound
    # Adding the input in pieces gives the same sketch as adding it whole.
    s = CountSketch(200, k, 0, key=5)
    whole = s(torch.tensor(x[None], dtype=torch.float32))
    parts = torch.zeros(1, k)
    for start in range(0, 200, 37):
        s.add(parts, start, torch.tensor(x[None, start:start + 37], dtype=torch.float32))
    torch.testing.assert_close(parts, whole)
