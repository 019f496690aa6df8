"""Retrieval metrics: where does each query's source example land in the ranking?"""

from __future__ import annotations

import numpy as np


def source_ranks(scores: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """1-based rank of each query's source among the scored columns -> [Q] (float).

    scores: [..., Q, N] similarity of each query to each scored training example (all of them, or
    a query's candidates); ground_truth: [Q] column of the source, -1 if it is not among them (rank
    inf: never retrieved). Ties count against the source (pessimistic), so a constant score ranks
    the source last rather than first.
    """
    present = ground_truth >= 0
    index = np.broadcast_to(np.where(present, ground_truth, 0)[:, None], scores.shape[:-1] + (1,))
    source = np.take_along_axis(scores, index, axis=-1)  # [..., Q, 1]
    ranks = (scores >= source).sum(axis=-1).astype(np.float64)
    return np.where(present, ranks, np.inf)


def per_query_metrics(ranks: np.ndarray, ks: list[int] | tuple[int, ...] = (10,)) -> dict[str, np.ndarray]:
    """Each metric's value per query (their means are the metrics): top1, mrr, recall_at_<k>."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"top1": (ranks == 1).astype(np.float64), "mrr": 1.0 / ranks}
    for k in ks:
        out[f"recall_at_{k}"] = (ranks <= k).astype(np.float64)
    return out


def retrieval_metrics(ranks: np.ndarray, ks: list[int] | tuple[int, ...] = (10,)) -> dict[str, float]:
    """top1, mrr and recall_at_<k> of 1-based ranks."""
    return {name: float(v.mean()) for name, v in per_query_metrics(ranks, ks).items()}


def bootstrap_intervals(
    ranks: np.ndarray, ks, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Percentile bootstrap intervals over queries of every metric: {<metric>_lo, <metric>_hi}.

    Seeded by (seed, number of queries) only, so rows scored on the same queries share resamples.
    """
    per_query = per_query_metrics(ranks, ks)
    n = len(ranks)
    idx = np.random.default_rng([seed, n]).integers(0, n, size=(n_boot, n))  # [B, n]
    tail = (1 - level) / 2 * 100
    out = {}
    for name, values in per_query.items():
        means = values[idx].mean(axis=1)
        out[f"{name}_lo"], out[f"{name}_hi"] = (float(x) for x in np.percentile(means, [tail, 100 - tail]))
    return out


def source_margins(scores: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """Score of the source minus the best other score, per query (> 0: ranked first; nan: not scored)."""
    present = ground_truth >= 0
    gt = np.where(present, ground_truth, 0)
    source = scores[np.arange(len(gt)), gt]
    others = scores.copy()
    others[np.arange(len(gt)), gt] = -np.inf
    return np.where(present, source - others.max(axis=1), np.nan)


def score_agreement(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """rho: cosine between score vectors over all scored pairs (last two axes) -> [...]."""
    a = scores.reshape(*scores.shape[:-2], -1).astype(np.float64)
    b = reference.reshape(-1, 1).astype(np.float64)
    denom = np.sqrt((a * a).sum(-1)) * np.sqrt((b * b).sum())
    return np.divide(matmul64(a, b)[..., 0], denom, out=np.zeros(a.shape[:-1]), where=denom > 0)


OBJECTIVES = ("top1", "mrr", "rho")


def objective_values(
    scores: np.ndarray, targets: np.ndarray, objective: str, reference: np.ndarray | None = None
) -> np.ndarray:
    """Objective of each leading slice of scores [..., Q, N]: top1, mrr, or rho against `reference`."""
    if objective == "rho":
        if reference is None:
            raise ValueError("objective rho needs the full gradient's scores as reference")
        return score_agreement(scores, reference)
    ranks = source_ranks(scores, targets)
    if objective == "top1":
        return np.mean(ranks == 1, axis=-1)
    if objective == "mrr":
        return np.mean(1.0 / ranks, axis=-1)
    raise ValueError(f"unknown objective {objective!r} (allowed: {', '.join(OBJECTIVES)})")


def cosine_scores(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Cosine similarity [Q, T] between rows of queries [Q, d] and train [T, d] (0 for zero rows)."""
    q = queries.astype(np.float64)
    t = train.astype(np.float64)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    tn = np.linalg.norm(t, axis=1, keepdims=True)
    q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
    t = np.divide(t, tn, out=np.zeros_like(t), where=tn > 0)
    return matmul64(q, t.T)


def matmul64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b of float64 arrays ([..., n, k] @ [k, m]) through torch's MKL, not numpy's BLAS: MKL's
    kernels are pinned by `numerics: portable` (tdabench.numerics), while numpy's OpenBLAS picks
    its own by CPU, so its products' last bits would follow the machine."""
    import torch

    return (
        torch.from_numpy(np.asarray(a, dtype=np.float64)) @ torch.from_numpy(np.asarray(b, dtype=np.float64))
    ).numpy()
