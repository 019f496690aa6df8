"""Choosing components from the similarity store: query splits, best single, greedy forward selection.

Choices are made on the *selection* queries only; every method is then scored on the held-out
rest (see tdabench.evaluate), so a selected subset is never graded on the queries that chose it.
Ties are broken deterministically: higher objective, then fewer parameters, then model order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tdabench.metrics import objective_value, source_ranks
from tdabench.similarity import Similarity, cosine_from_sums

# Objectives are compared after rounding, so that the same ranks summed in another order count as a tie.
_DECIMALS = 12
# Upper bound on candidates x queries x train scores held at once during greedy selection.
_MAX_SCORES = 2**25


@dataclass(frozen=True)
class SelectionConfig:
    selection_fraction: float = 0.5
    split_seed: int = 0
    objective: str = "mrr"


def split_queries(query_ids: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection, held-out) row indices of `query_ids`, each sorted; seeded, independent of input order."""
    n = len(query_ids)
    if n < 2:
        raise ValueError(f"need at least 2 queries to split into selection and held-out, got {n}")
    canonical = np.argsort(np.array(query_ids, dtype=object), kind="stable")
    order = canonical[np.random.default_rng(seed).permutation(n)]
    n_sel = min(n - 1, max(1, round(fraction * n)))
    return np.sort(order[:n_sel]), np.sort(order[n_sel:])


def _pick(values: np.ndarray, params: np.ndarray, index: np.ndarray) -> int:
    """Position of the best candidate: max value, then fewest params, then lowest model index."""
    order = np.lexsort((index, params, -np.round(values, _DECIMALS)))
    return int(order[0])


def single_component_objectives(sim: Similarity, queries: np.ndarray, objective: str) -> np.ndarray:
    """Objective of each component alone on `queries` -> [C]."""
    gt = sim.ground_truth[queries]
    return np.array([
        objective_value(source_ranks(sim.scores([c], queries), gt), objective)
        for c in range(len(sim.components))
    ])


def best_single(sim: Similarity, queries: np.ndarray, objective: str) -> int:
    values = single_component_objectives(sim, queries, objective)
    idx = np.arange(len(values))
    return int(idx[_pick(values, sim.component_params, idx)])


@dataclass(frozen=True)
class GreedyStep:
    step: int  # 1-based
    component: int  # index of the component added at this step
    objective: float  # on the selection queries, of the subset after this step


def greedy_forward(sim: Similarity, queries: np.ndarray, objective: str) -> list[GreedyStep]:
    """Forward selection run to the end: at each step add the component that maximises `objective`
    of the subset's cosine on `queries`. Vectorised over candidates from running sums."""
    gt = sim.ground_truth[queries]
    dot = sim.dot[:, queries].astype(np.float64)  # [C, Qs, T]
    qsq = sim.query_sqnorm[:, queries].astype(np.float64)  # [C, Qs]
    tsq = sim.train_sqnorm.astype(np.float64)  # [C, T]
    n_c, n_q, n_t = dot.shape
    chunk = max(1, _MAX_SCORES // max(1, n_q * n_t))

    run_dot = np.zeros((n_q, n_t))
    run_q = np.zeros(n_q)
    run_t = np.zeros(n_t)
    remaining = list(range(n_c))
    steps: list[GreedyStep] = []
    while remaining:
        values = np.empty(len(remaining))
        for lo in range(0, len(remaining), chunk):
            cand = np.array(remaining[lo:lo + chunk])
            scores = cosine_from_sums(run_dot + dot[cand], run_q + qsq[cand], run_t + tsq[cand])  # [R, Qs, T]
            for j, s in enumerate(scores):
                values[lo + j] = objective_value(source_ranks(s, gt), objective)
        cand = np.array(remaining)
        pos = _pick(values, sim.component_params[cand], cand)
        best = int(cand[pos])
        run_dot += dot[best]
        run_q += qsq[best]
        run_t += tsq[best]
        remaining.remove(best)
        steps.append(GreedyStep(len(steps) + 1, best, float(values[pos])))
    return steps


def best_prefix(steps: list[GreedyStep], sim: Similarity) -> int:
    """Number of greedy steps whose subset scored best on the selection queries (ties: smaller)."""
    values = np.array([s.objective for s in steps])
    params = np.cumsum([sim.component_params[s.component] for s in steps])
    return _pick(values, params, np.arange(len(steps))) + 1
