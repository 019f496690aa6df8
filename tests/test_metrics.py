import numpy as np

from tdabench.metrics import cosine_scores, retrieval_metrics, source_ranks


def naive_rank(row, gt):
    """1 + number of *other* candidates scoring at least as high as the source."""
    return 1 + sum(1 for j, s in enumerate(row) if j != gt and s >= row[gt])


def test_ranks_match_naive_loop_including_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 9)).astype(float)  # many ties
    gt = rng.integers(0, 9, size=50)
    got = source_ranks(scores, gt)
    assert got.tolist() == [naive_rank(r, g) for r, g in zip(scores, gt)]


def test_metrics_of_known_ranks():
    m = retrieval_metrics(np.array([1, 2, 4, 20]), ks=[1, 5])
    assert m["top1"] == 0.25
    assert m["recall_at_1"] == 0.25
    assert m["recall_at_5"] == 0.75
    assert np.isclose(m["mrr"], (1 + 1 / 2 + 1 / 4 + 1 / 20) / 4)


def test_cosine_scores_match_definition_and_zero_rows():
    rng = np.random.default_rng(1)
    q, t = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    t[2] = 0
    got = cosine_scores(q, t)
    for i in range(3):
        for j in range(4):
            denom = np.linalg.norm(q[i]) * np.linalg.norm(t[j])
            want = 0.0 if denom == 0 else q[i] @ t[j] / denom
            assert np.isclose(got[i, j], want)


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_more_queries():
    from tdabench.metrics import bootstrap_intervals

    rng = np.random.default_rng(0)
    small = rng.integers(1, 5, size=40).astype(float)
    large = rng.integers(1, 5, size=4000).astype(float)
    ci_small = bootstrap_intervals(small, [1], n_boot=500, seed=1)
    ci_large = bootstrap_intervals(large, [1], n_boot=500, seed=1)
    m = retrieval_metrics(small, [1])
    assert ci_small["top1_lo"] <= m["top1"] <= ci_small["top1_hi"]
    assert ci_small["mrr_lo"] < m["mrr"] < ci_small["mrr_hi"]
    width = lambda ci: ci["top1_hi"] - ci["top1_lo"]  # noqa: E731
    assert width(ci_large) < width(ci_small) / 5  # ~ 1/sqrt(n): 10x more precise
    assert bootstrap_intervals(small, [1], n_boot=500, seed=1) == ci_small  # seeded
    # Normal approximation for a proportion: half-width ~ 1.96 sqrt(p(1-p)/n).
    p = m["top1"]
    assert abs(width(ci_small) / 2 - 1.96 * np.sqrt(p * (1 - p) / 40)) < 0.03


def test_margins_are_source_minus_best_other():
    from tdabench.metrics import source_margins

    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.0, 0.0, 0.0]])
    got = source_margins(scores, np.array([0, 2, -1]))
    assert np.allclose(got[:2], [0.4, -0.5]) and np.isnan(got[2])
