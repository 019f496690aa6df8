"""The candidate protocol of the evaluation table against a naive loop and against the
candidate-layout similarity store (an independent code path)."""

import numpy as np

from tdabench.data.bm25 import top_candidates
from tdabench.evaluate import Scoring, evaluate_split
from tdabench.selection import SelectionTable
from tdabench.similarity import Similarity

from helpers import brute_force_ranks, similarity_from_gradients


def random_similarity(rng, n_comp=3, n_query=12, n_train=20, dim=4):
    q = rng.standard_normal((n_comp, n_query, dim))
    t = rng.standard_normal((n_comp, n_train, dim))
    truth = rng.integers(0, n_train, n_query)
    q += 0.7 * t[:, truth]  # queries lean towards their sources, so ranks vary
    names = [f"model.layers.0.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")][:n_comp]
    sim = similarity_from_gradients(
        list(q), list(t), truth, names=names, families=["gate", "up", "down"][:n_comp], layers=[0] * n_comp
    )
    return sim, q, t


def selection_table(sim):
    """Split 0 chose the first component as best single and the first two greedy steps."""
    rows = [{"split": 0, "kind": "single", "component": c, "chosen": i == 0} for i, c in enumerate(sim.components)]
    rows += [
        {"split": 0, "kind": "greedy", "component": c, "chosen": i == 1, "step": i + 1}
        for i, c in enumerate(sim.components[:2])
    ]
    return SelectionTable.from_rows(rows, "s", "mrr")


def test_candidate_protocol_matches_naive_loop_and_candidate_layout():
    rng = np.random.default_rng(0)
    sim, q, t = random_similarity(rng)
    bm25 = rng.standard_normal((len(sim.query_ids), len(sim.train_ids)))
    cands = top_candidates(bm25, sim.ground_truth, 5)  # [Q, 5]
    held = np.arange(4, 12)
    scoring = Scoring((1, 3), n_boot=10, boot_seed=0)
    rows, _ = evaluate_split(sim, "s", 0, held, selection_table(sim), [], {"prompt": bm25}, scoring, cands)
    by = {(r["protocol"], r["method"], r.get("components")): r for r in rows}

    # Naive: full gradient cosine within each query's candidates, source found by id.
    ranks = brute_force_ranks(list(q), list(t), sim.ground_truth, range(len(q)), held, cands)
    full = by[("candidates", "full", "all")]
    assert full["top1"] == np.mean(ranks == 1) and np.isclose(full["mrr"], np.mean(1 / ranks)) and full["b"] == 5
    assert by[("corpus", "full", "all")].get("b") is None
    assert by[("candidates", "chance", "")]["top1"] == 1 / 5

    # The same store in candidate layout, evaluated without `candidates`, gives the same rows.
    layout = Similarity(
        **{
            **sim.__dict__,
            "dot": np.take_along_axis(sim.dot, cands[None], axis=2),
            "candidates": cands,
            "component_dim": None,
        }
    )
    rows_layout, _ = evaluate_split(layout, "s", 0, held, selection_table(sim), [], {"prompt": bm25}, scoring)
    within = [r for r in rows if r["protocol"] == "candidates" and r["method"] != "chance"]
    assert len(within) == len(rows_layout) - 1  # all but chance
    for a, b in zip(within, [r for r in rows_layout if r["method"] != "chance"]):
        assert (a["method"], a.get("components")) == (b["method"], b.get("components"))
        assert a["top1"] == b["top1"] and np.isclose(a["mrr"], b["mrr"])


def test_bm25_candidates_force_the_source_into_the_last_slot():
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    out = top_candidates(scores, np.array([0, 0]), 2)
    assert out.tolist() == [[0, 1], [3, 0]]
