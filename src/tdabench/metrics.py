"""Retrieval metrics: where does each query's source example land in the ranking?"""

from __future__ import annotations

import numpy as np


def source_ranks(scores: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """1-based rank of each query's source among all candidates -> [Q].

    scores: [Q, T] similarity of each query to each training example; ground_truth: [Q] column
    index of the source. Ties count against the source (pessimistic), so a constant score
    ranks the source last rather than first.
    """
    source = np.take_along_axis(scores, ground_truth[:, None], axis=1)  # [Q, 1]
    return (scores >= source).sum(axis=1)


def retrieval_metrics(ranks: np.ndarray, ks: list[int] | tuple[int, ...] = (10,)) -> dict[str, float]:
    """top1, mrr and recall_at_<k> of 1-based ranks."""
    ranks = np.asarray(ranks)
    out = {"top1": float(np.mean(ranks == 1)), "mrr": float(np.mean(1.0 / ranks))}
    for k in ks:
        out[f"recall_at_{k}"] = float(np.mean(ranks <= k))
    return out


def objective_value(ranks: np.ndarray, objective: str) -> float:
    if objective == "top1":
        return float(np.mean(ranks == 1))
    if objective == "mrr":
        return float(np.mean(1.0 / ranks))
    raise ValueError(f"unknown objective {objective!r} (allowed: top1, mrr)")


def cosine_scores(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Cosine similarity [Q, T] between rows of queries [Q, d] and train [T, d] (0 for zero rows)."""
    q = queries.astype(np.float64)
    t = train.astype(np.float64)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    tn = np.linalg.norm(t, axis=1, keepdims=True)
    q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
    t = np.divide(t, tn, out=np.zeros_like(t), where=tn > 0)
    return q @ t.T
