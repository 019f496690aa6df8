"""Projections: one fixed matrix over the concatenated gradient, unbiased inner products."""

import numpy as np
import pytest
import torch

from tdabench.projection import (
    CHUNK,
    Block,
    ProjectionConfig,
    Projector,
    block_dims,
    method_config,
    project_component,
    project_many,
    project_store,
)
from tdabench.store import GradientStore

from helpers import random_store

DIMS = [7, 5, 12]


def explicit_matrix(cfg, dims):
    """P^T [D, k], assembled by projecting identity rows of each component block."""
    blocks = [project_component(torch.eye(d), c, cfg).numpy() for c, d in enumerate(dims)]
    return np.concatenate(blocks)


def explicit_any(cfg, dims):
    """P^T [D, out_dim] of any projection (full or block-wise), by projecting identity rows."""
    proj = Projector(cfg, dims)
    rows = []
    for c, d in enumerate(dims):
        out = np.zeros((d, proj.out_dim), dtype=np.float32)
        proj.add(out, c, torch.eye(d))
        rows.append(out)
    return np.concatenate(rows)


@pytest.mark.parametrize(
    "method",
    [
        "sjlt",
        "gaussian",
        "rademacher",
        "blockwise",
        "blockwise_equal",
        "blockwise_unnormalized",
        "paper",
        "paper_normalized",
    ],
)
def test_streamed_projection_equals_explicit_matrix(tmp_path, method):
    data = random_store(tmp_path / "g.h5", [f"s{i}" for i in range(6)], DIMS, seed=0)
    cfg = method_config(method, k=6, seed=7, nonzeros=2)
    full = np.concatenate(list(data.values()), axis=1)  # [n, D] the concatenated gradients
    with GradientStore(tmp_path / "g.h5") as store:
        got = project_store(store, cfg, block_rows=4)
        sub = project_store(store, cfg, rows=np.array([4, 1]))
    matrix = explicit_any(cfg, DIMS)
    want = full @ matrix
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sub, want[[4, 1]], rtol=1e-5, atol=1e-5)
    if cfg.blockwise:  # block-diagonal: component c only reaches its own k_c output dims
        offsets = np.cumsum([0] + block_dims(DIMS, 6, cfg.blockwise))
        starts = np.cumsum([0] + DIMS)
        for c in range(len(DIMS)):
            block = matrix[starts[c] : starts[c + 1]]
            assert not block[:, : offsets[c]].any() and not block[:, offsets[c + 1] :].any()


def test_select_then_project_uses_the_full_projections_blocks(tmp_path):
    data = random_store(tmp_path / "g.h5", [f"s{i}" for i in range(5)], DIMS, seed=2)
    names = list(data)
    cfg = ProjectionConfig("gaussian", k=4, seed=1, nonzeros=1)
    with GradientStore(tmp_path / "g.h5") as store:
        got = project_store(store, cfg, components=[names[2], names[0]])
    want = (
        data[names[0]] @ explicit_matrix(cfg, DIMS)[: DIMS[0]]
        + data[names[2]] @ explicit_matrix(cfg, DIMS)[DIMS[0] + DIMS[1] :]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_block_dims_split_k():
    assert block_dims([100, 300, 600], 10, "proportional") == [1, 3, 6]
    assert block_dims([100, 300, 600], 10, "equal") == [4, 3, 3]
    assert block_dims([1, 1000], 10, "proportional") == [1, 10]  # every block keeps a dimension


def test_the_papers_block_sizes_on_amd_olmo_1b():
    """max(512, 512 round(P_c / M k / 512)) at 1 % and 5 % of AMD-OLMo-1B's 1,176,764,416 parameters."""
    h, mlp, vocab = 2048, 8192, 50_304
    dims = [vocab * h] + [h * h] * 4 * 16 + [h * mlp] * 3 * 16  # the tied embedding, then q k v o, gate up down
    m = sum(dims)
    assert m == 1_176_764_416
    for share in (0.01, 0.05):
        k = round(share * m)
        got = block_dims(dims, k, "paper")
        for d, kc in zip(dims, got):  # the formula, written out once more
            assert kc == max(512, 512 * round(d / m * k / 512)) and kc % 512 == 0
        assert abs(sum(got) - k) < 512 * len(dims) / 2  # each block rounds by at most 256
    assert block_dims([10, 20, 3000], 1000, "paper") == [512, 512, 1024]  # at least 512 each


def test_same_seed_same_matrix_other_seed_other_matrix():
    a = explicit_matrix(ProjectionConfig("gaussian", 8, seed=1, nonzeros=1), DIMS)
    b = explicit_matrix(ProjectionConfig("gaussian", 8, seed=1, nonzeros=1), DIMS)
    c = explicit_matrix(ProjectionConfig("gaussian", 8, seed=2, nonzeros=1), DIMS)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_sjlt_columns_have_one_signed_entry():
    m = explicit_matrix(ProjectionConfig("sjlt", 16, seed=0, nonzeros=1), DIMS)  # [D, k]
    assert ((m != 0).sum(1) == 1).all()
    assert set(np.abs(m[m != 0]).round(6)) == {1.0}


def test_gaussian_blocks_longer_than_a_chunk_are_consistent():
    cfg = ProjectionConfig("gaussian", 3, seed=0, nonzeros=1)
    x = torch.randn(2, CHUNK + 5)
    whole = project_component(x, 0, cfg)
    p = project_component(torch.eye(CHUNK + 5), 0, cfg)  # [D, k]
    torch.testing.assert_close(whole, x @ p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_chunks_drawn_in_threads_give_the_projection_drawn_in_order(monkeypatch, kind):
    import tdabench.projection as P

    monkeypatch.setattr(P, "CHUNK", 16)  # 8 chunks, the last one short
    x = torch.randn(3, 16 * 7 + 5, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # (the draws may use up to the job's threads)
    try:
        monkeypatch.setattr(P, "MAX_DRAW_THREADS", 1)
        in_order = project_component(x, 2, ProjectionConfig(kind, 5, seed=3, nonzeros=1))
        monkeypatch.setattr(P, "MAX_DRAW_THREADS", 4)
        threaded = project_component(x, 2, ProjectionConfig(kind, 5, seed=3, nonzeros=1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(in_order, threaded)
    explicit = project_component(torch.eye(x.shape[1]), 2, ProjectionConfig(kind, 5, seed=3, nonzeros=1))  # [D, k]
    torch.testing.assert_close(threaded, x @ explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 4])
def test_many_projections_at_once_are_each_projection(monkeypatch, threads):
    """Bit for bit, except blocks that share a product: those to float32 rounding."""
    import tdabench.projection as P

    monkeypatch.setattr(P, "CHUNK", 16)  # 8 chunks, the last one short
    monkeypatch.setattr(P, "FUSED_COLUMNS", 16)
    x = torch.randn(5, 16 * 7 + 5, generator=torch.Generator().manual_seed(1))
    blocks = [
        Block(ProjectionConfig("gaussian", 6, seed=0, nonzeros=1), 2, 6),
        Block(ProjectionConfig("gaussian", 6, seed=1, nonzeros=1), 2, 6),
        Block(ProjectionConfig("rademacher", 9, seed=0, nonzeros=1, normalized=False), 0, 3),
        Block(ProjectionConfig("sjlt", 7, seed=0, nonzeros=1), 2, 7),
        Block(ProjectionConfig("sjlt", 3, seed=0, nonzeros=1), 2, 3),  # the signs above, another k
        Block(ProjectionConfig("sjlt", 11, seed=4, nonzeros=3), 1, 11),  # three sweeps, in turn
        Block(ProjectionConfig("sjlt", 5, seed=2, nonzeros=2, normalized=False), 2, 5),
        Block(ProjectionConfig("gaussian", 40, seed=3, nonzeros=1, blockwise="proportional"), 5, 13),
        Block(ProjectionConfig("rademacher", 20, seed=1, nonzeros=1), 2, 20),  # too wide to share
        Block(ProjectionConfig("gaussian", 40, seed=5, nonzeros=1, blockwise="proportional"), 1, 2),
    ]
    products = P._fused([(i, b.k) for i, b in enumerate(blocks) if b.cfg.kind != "sjlt"])
    assert products == [[(0, 6), (1, 6), (2, 3)], [(7, 13), (9, 2)], [(8, 20)]]
    sketches = {
        i: P.CountSketch(x.shape[1], b.k, b.cfg.seed, (b.index, 0)) for i, b in enumerate(blocks) if i in (3, 4, 6)
    }
    assert P._sign_groups(sketches, blocks) == [[3, 4], [6]]  # one signing for both; none with another scale
    shared = {i for p in products if len(p) > 1 for i, _ in p}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # (a small product's bits may depend on the threads: both sides at the same)
    try:
        want = [project_component(x, b.index, b.cfg, k=b.k) for b in blocks]  # one projection at a time
        got, seconds = project_many(x, blocks)
    finally:
        torch.set_num_threads(saved)
    for i, (b, g, w) in enumerate(zip(blocks, got, want)):
        assert g.shape == (5, b.k)
        if i in shared:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=str(b))
        else:
            assert torch.equal(g, w), b
    assert len(seconds) == len(blocks) and all(t >= 0 for t in seconds)
    assert project_many(x, []) == ([], [])
    apart, _ = project_many([x[:2], x[2:]], [blocks[i] for i in (3, 4, 5, 6)])  # row blocks held apart
    for i, g in zip((3, 4, 5, 6), apart):
        assert torch.equal(g, want[i]), blocks[i]


def mean_inner_product(cfg_of_seed, dims, x, y, n_seeds):
    """Average over seeds of <Px, Py> for vectors split into components of `dims`."""
    est = []
    for seed in range(n_seeds):
        cfg = cfg_of_seed(seed)
        proj = Projector(cfg, dims)
        px, py = np.zeros((1, proj.out_dim), np.float32), np.zeros((1, proj.out_dim), np.float32)
        start = 0
        for c, d in enumerate(dims):
            proj.add(px, c, torch.tensor(x[None, start : start + d], dtype=torch.float32))
            proj.add(py, c, torch.tensor(y[None, start : start + d], dtype=torch.float32))
            start += d
        est.append(float(px[0] @ py[0]))
    return np.mean(est), proj.out_dim


@pytest.mark.parametrize(
    "method,nonzeros",
    [
        ("gaussian", 1),
        ("rademacher", 1),
        ("sjlt", 1),
        ("sjlt", 4),
        ("blockwise", 1),
        ("blockwise_equal", 1),
        ("paper_normalized", 1),
    ],
)
def test_inner_products_are_unbiased_within_jl_bound(method, nonzeros):
    rng = np.random.default_rng(0)
    dims = [10, 30]
    x, y = rng.standard_normal(40), rng.standard_normal(40)
    y += 0.5 * x
    k, n_seeds = 16, 600
    mean, _ = mean_inner_product(lambda s: method_config(method, k, s, nonzeros), dims, x, y, n_seeds)
    true = x @ y
    # Var[<Px,Py>] <= (|x|^2 |y|^2 + <x,y>^2) * 2 / k_min for these sketches: 5 standard errors.
    split = method_config(method, k, 0).blockwise
    k_min = min(block_dims(dims, k, split)) if split else k
    bound = np.sqrt((x @ x * (y @ y) + true**2) * 2 / k_min / n_seeds)
    assert abs(mean - true) < 5 * bound


def test_unnormalised_blockwise_weights_components_by_their_dimensions():
    rng = np.random.default_rng(3)
    dims = [8, 32]  # k_c = 4 and 16 for k = 20: block 2 should count 16x, block 1 4x
    x, y = rng.standard_normal(40), rng.standard_normal(40)
    y += 0.5 * x
    k, n_seeds = 20, 1500
    mean, _ = mean_inner_product(lambda s: method_config("blockwise_unnormalized", k, s), dims, x, y, n_seeds)
    k_c = block_dims(dims, k, "proportional")
    assert k_c == [4, 16]
    weighted = k_c[0] * (x[:8] @ y[:8]) + k_c[1] * (x[8:] @ y[8:])  # what the published variant estimates
    var = sum(
        kc * (np.sum(x[a:b] ** 2) * np.sum(y[a:b] ** 2) + (x[a:b] @ y[a:b]) ** 2)
        for kc, (a, b) in zip(k_c, [(0, 8), (8, 40)])
    )
    assert abs(mean - weighted) < 5 * np.sqrt(var / n_seeds)
    assert abs(mean - x @ y) > 10 * np.sqrt(var / n_seeds)  # and clearly not the plain inner product


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
        s.add(parts, start, torch.tensor(x[None, start : start + 37], dtype=torch.float32))
    torch.testing.assert_close(parts, whole)
