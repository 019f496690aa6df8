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
