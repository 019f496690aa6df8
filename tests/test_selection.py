"""Greedy forward selection against a brute-force reimplementation on tiny cases."""

import numpy as np
import pytest

from tdabench.selection import best_prefix, best_single, greedy_forward, split_queries
from tdabench.similarity import Similarity

from helpers import brute_force_ranks, similarity_from_gradients


def make_case(seed, n_c=5, n_q=6, n_t=7, dims=(3, 1, 4, 2, 3)):
    """Raw gradients per component plus the similarity store built from them by hand."""
    rng = np.random.default_rng(seed)
    qg = [rng.standard_normal((n_q, d)) for d in dims[:n_c]]
    tg = [rng.standard_normal((n_t, d)) for d in dims[:n_c]]
    gt = rng.integers(0, n_t, n_q)
    for c in range(n_c):  # make the source a bit similar so objectives are not all zero
        qg[c] += 0.7 * tg[c][gt]
    return similarity_from_gradients(qg, tg, gt), qg, tg


def brute_objective(subset, queries, qg, tg, gt, objective):
    """Concatenate the raw vectors and rank by an explicit loop."""
    ranks = brute_force_ranks(qg, tg, gt, subset, queries)
    return float(np.mean(ranks == 1)) if objective == "top1" else float(np.mean(1.0 / ranks))


def brute_greedy(sim, qg, tg, queries, objective):
    chosen, remaining, trace = [], list(range(len(qg))), []
    while remaining:
        scored = [(brute_objective(chosen + [c], queries, qg, tg, sim.ground_truth, objective), c) for c in remaining]
        best_value = max(round(v, 12) for v, _ in scored)
        ties = [c for v, c in scored if round(v, 12) == best_value]
        pick = min(ties, key=lambda c: (sim.component_params[c], c))  # fewer params, then model order
        chosen.append(pick)
        remaining.remove(pick)
        trace.append((pick, best_value))
    return trace


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("objective", ["top1", "mrr"])
def test_greedy_equals_brute_force(seed, objective):
    sim, qg, tg = make_case(seed)
    queries = np.array([0, 2, 3, 5])
    steps = greedy_forward(sim, queries, objective)
    want = brute_greedy(sim, qg, tg, queries, objective)
    assert [s.component for s in steps] == [c for c, _ in want]
    assert np.allclose([s.objective for s in steps], [v for _, v in want])
    assert best_single(sim, queries, objective) == steps[0].component


def test_tie_break_prefers_fewer_parameters_then_model_order():
    sim, _, _ = make_case(0, dims=(3, 1, 4, 1, 3))
    sim.dot[:] = 0.0  # every subset scores the same: only the tie-break decides
    steps = greedy_forward(sim, np.arange(6), "top1")
    assert [s.component for s in steps] == [1, 3, 0, 4, 2]
    assert best_prefix(steps, sim) == 1


def test_split_is_seeded_disjoint_and_order_independent():
    ids = [f"q{i:03d}" for i in range(40)]
    sel, held = split_queries(ids, 0.25, seed=3)
    assert len(sel) == 10 and len(held) == 30
    assert set(sel).isdisjoint(held) and set(sel) | set(held) == set(range(40))
    shuffled = list(reversed(ids))
    sel2, _ = split_queries(shuffled, 0.25, seed=3)
    assert sorted(shuffled[i] for i in sel2) == sorted(ids[i] for i in sel)
    other, _ = split_queries(ids, 0.25, seed=4)
    assert set(other) != set(sel)


def test_best_prefix_picks_highest_objective_then_smallest():
    sim, _, _ = make_case(1)
    steps = greedy_forward(sim, np.arange(6), "mrr")
    n = best_prefix(steps, sim)
    best = max(round(s.objective, 12) for s in steps)
    assert round(steps[n - 1].objective, 12) == best
    assert all(round(s.objective, 12) < best for s in steps[: n - 1])


def brute_budget_greedy(sim, qg, tg, queries, objective, max_params):
    chosen, trace = [], []
    while True:
        used = sum(sim.component_params[c] for c in chosen)
        fits = [c for c in range(len(qg)) if c not in chosen and used + sim.component_params[c] <= max_params]
        if not fits:
            return trace
        scored = [
            (round(brute_objective(chosen + [c], queries, qg, tg, sim.ground_truth, objective), 12), c) for c in fits
        ]
        best = max(v for v, _ in scored)
        pick = min((c for v, c in scored if v == best), key=lambda c: (sim.component_params[c], c))
        chosen.append(pick)
        trace.append(pick)


@pytest.mark.parametrize("seed", range(3))
def test_budgeted_greedy_equals_brute_force(seed):
    sim, qg, tg = make_case(seed)  # params 3, 1, 4, 2, 3
    queries = np.arange(6)
    for budget in (1, 4, 6, 9):
        steps = greedy_forward(sim, queries, "mrr", max_params=budget)
        assert [s.component for s in steps] == brute_budget_greedy(sim, qg, tg, queries, "mrr", budget)
        assert sum(sim.component_params[s.component] for s in steps) <= budget


def test_rho_objective_is_agreement_with_the_full_scores():
    from tdabench.metrics import score_agreement

    sim, _, _ = make_case(5)
    q = np.arange(6)
    steps = greedy_forward(sim, q, "rho")
    assert np.isclose(steps[-1].objective, 1.0)  # all components: the full gradient itself
    full = sim.scores(None, q)
    first = sim.scores([steps[0].component], q)
    assert np.isclose(steps[0].objective, score_agreement(first, full))
    for c in range(5):  # the first pick has the highest agreement of any single component
        assert score_agreement(sim.scores([c], q), full) <= steps[0].objective + 1e-12


def test_candidate_layout_scores_match_dense_columns():
    sim, _, _ = make_case(6)
    rng = np.random.default_rng(0)
    rows = []
    for q, gt in enumerate(sim.ground_truth):  # the source is the last candidate of queries 0-2 only
        others = rng.permutation([t for t in range(7) if t != gt])
        rows.append(list(others[:3]) + [gt] if q < 3 else list(others[:4]))
    cands = np.array(rows)  # [Q, b]
    dense_scores = sim.scores([0, 2])
    cand_sim = Similarity(
        **{**sim.__dict__, "dot": np.take_along_axis(sim.dot, cands[None], axis=2), "candidates": cands}
    )
    np.testing.assert_allclose(cand_sim.scores([0, 2]), np.take_along_axis(dense_scores, cands, axis=1))
    assert cand_sim.targets().tolist()[:3] == [3, 3, 3] and (cand_sim.targets()[3:] == -1).all()
    steps = greedy_forward(cand_sim, np.arange(6), "mrr")  # runs on the candidate layout
    assert len(steps) == 5
