"""The candidate protocol of the evaluation table against a naive loop and against the
candidate-layout similarity store (an independent code path)."""

import numpy as np
import polars as pl

from tdabench.data.bm25 import top_candidates
from tdabench.evaluate import Scoring, evaluate_split
from tdabench.similarity import Similarity


def random_similarity(rng, n_comp=3, n_query=12, n_train=20, dim=4):
    q = rng.standard_normal((n_comp, n_query, dim))
    t = rng.standard_normal((n_comp, n_train, dim))
    truth = rng.integers(0, n_train, n_query)
    q += 0.7 * t[:, truth]  # queries lean towards their sources, so ranks vary
    sim = Similarity(
        components=[f"model.layers.0.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")][:n_comp],
        component_params=np.full(n_comp, dim), component_family=["gate", "up", "down"][:n_comp],
        component_layer=np.zeros(n_comp, dtype=np.int64), query_ids=[f"q{i}" for i in range(n_query)],
        train_ids=[f"t{i}" for i in range(n_train)], ground_truth=truth,
        query_sqnorm=(q**2).sum(-1), train_sqnorm=(t**2).sum(-1), dot=np.einsum("cqd,ctd->cqt", q, t), attrs={})
    return sim, q, t


def selection_table(sim):
    rows = [{"kind": "single", "component": c, "chosen": i == 0, "step": None, "budget": None}
            for i, c in enumerate(sim.components)]
    rows += [{"kind": "greedy", "component": c, "chosen": i == 1, "step": i + 1, "budget": None}
             for i, c in enumerate(sim.components[:2])]
    return pl.DataFrame(rows, schema={"kind": pl.Utf8, "component": pl.Utf8, "chosen": pl.Boolean,
                                      "step": pl.Int64, "budget": pl.Float64})


def test_candidate_protocol_matches_naive_loop_and_candidate_layout():
    rng = np.random.default_rng(0)
    sim, q, t = random_similarity(rng)
    bm25 = rng.standard_normal((len(sim.query_ids), len(sim.train_ids)))
    cands = top_candidates(bm25, sim.ground_truth, 5)  # [Q, 5]
    held = np.arange(4, 12)
    scoring = Scoring((1, 3), n_boot=10)
    rows, _ = evaluate_split(sim, "s", 0, held, selection_table(sim), [], {"prompt": bm25}, scoring, cands)
    by = {(r["protocol"], r["method"], r.get("components")): r for r in rows}

    # Naive: full gradient cosine within each query's candidates, source found by id.
    qf, tf = np.concatenate(list(q), -1), np.concatenate(list(t), -1)  # [Q, C*d], [T, C*d]
    hits = []
    for i in held:
        cos = [qf[i] @ tf[j] / np.linalg.norm(qf[i]) / np.linalg.norm(tf[j]) for j in cands[i]]
        hits.append(cands[i][int(np.argmax(cos))] == sim.ground_truth[i])
    full = by[("candidates", "full", "all")]
    assert full["top1"] == np.mean(hits) and full["b"] == 5
    assert by[("corpus", "full", "all")].get("b") is None
    assert by[("candidates", "chance", "")]["top1"] == 1 / 5

    # The same store in candidate layout, evaluated without `candidates`, gives the same rows.
    layout = Similarity(**{**sim.__dict__, "dot": np.take_along_axis(sim.dot, cands[None], axis=2),
                           "candidates": cands, "component_dim": None})
    rows_layout, _ = evaluate_split(layout, "s", 0, held, selection_table(sim), [],
                                    {"prompt": bm25}, scoring)
    within = [r for r in rows if r["protocol"] == "candidates" and r["method"] != "chance"]
    assert len(within) == len(rows_layout) - 1  # all but chance
    for a, b in zip(within, [r for r in rows_layout if r["method"] != "chance"]):
        assert (a["method"], a.get("components")) == (b["method"], b.get("components"))
        assert a["top1"] == b["top1"] and np.isclose(a["mrr"], b["mrr"])


def test_bm25_candidates_force_the_source_into_the_last_slot():
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    out = top_candidates(scores, np.array([0, 0]), 2)
    assert out.tolist() == [[0, 1], [3, 0]]
