"""The candidate protocol of the evaluation table against a naive loop and against the
candidate-layout similarity store (an independent code path)."""

import numpy as np
import polars as pl

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


def results_rows(rng) -> pl.DataFrame:
    """A results table by hand: two settings, three splits, the headline's kinds of method."""
    methods = [  # method, variant, k, budget, dim, n_components
        ("full", None, None, None, 900, 6),
        ("greedy", None, None, None, 300, 2),
        ("greedy_budget", "budget 0.2", None, 0.2, 150, 1),
        ("best_single", None, None, None, 150, 1),
        ("projection", "sjlt", 16, None, 16, 6),
        ("projection", "sjlt", 64, None, 64, 6),
        ("projection", "gaussian", 64, None, 64, 6),
        ("select_then_project", "select_then_project", 64, None, 64, 2),
        ("bm25", "prompt", None, None, 0, 0),
        ("bm25", "prompt_response", None, None, 0, 0),
    ]
    rows = []
    for setting in ("paraphrased", "model_generated"):
        for split in range(3):
            for method, variant, k, budget, dim, n_comp in methods:
                top1 = float(rng.integers(0, 100)) / 100
                rows.append(
                    dict(
                        setting=setting, protocol="dense", split=split, method=method, variant=variant,
                        components="all" if dim else "", k=k, budget=budget, dim=dim, top1=top1,
                        mrr=top1, seconds_per_sample=None, top1_lo=top1, top1_hi=top1, mrr_lo=top1,
                        mrr_hi=top1, n_components=float(n_comp + split % 2), n_queries=10, n_train=20,
                    )
                )  # fmt: skip
    return pl.DataFrame(rows, infer_schema_length=None)


def test_the_answer_lines_name_the_best_of_each_approach_as_a_loop_finds_them():
    from tdabench.evaluate import answer_lines

    table = results_rows(np.random.default_rng(0))
    lines = answer_lines(table)
    assert [line.split(":")[0] for line in lines] == ["paraphrased", "model_generated"]
    for line in lines:
        setting = line.split(":")[0]
        mean = {}  # (method, variant, k) -> mean top-1 over splits, by a plain loop
        for r in table.filter(pl.col("setting") == setting).iter_rows(named=True):
            mean.setdefault((r["method"], r["variant"], r["k"]), []).append(r["top1"])
        mean = {key: sum(v) / len(v) for key, v in mean.items()}
        selection = max(v for (m, _, _), v in mean.items() if m in ("greedy", "greedy_budget", "best_single"))
        projection = max(v for (m, _, k), v in mean.items() if m == "projection" and k == 64)
        bm25 = max(v for (m, _, _), v in mean.items() if m == "bm25")
        assert f"full gradient {mean[('full', None, None)]:.3f} (900 dims)" in line
        assert f"best selection {selection:.3f} (" in line
        assert f"best projection {projection:.3f} (" in line and " k=64, 64 dims)" in line
        assert f"BM25 {bm25:.3f} (prompt" in line
    # A NaN result is nobody's best (polars sorts NaN above every number).
    broken = table.with_columns(
        pl.when((pl.col("method") == "projection") & (pl.col("variant") == "gaussian"))
        .then(float("nan"))
        .otherwise(pl.col("top1"))
        .alias("top1")
    )
    assert all("nan" not in line and "best projection" in line for line in answer_lines(broken))


def test_method_runs_lead_with_the_method_and_leave_out_params_that_do_not_apply():
    from tdabench.evaluate import headline
    from tdabench.pipeline.summary import method_params, method_run_name

    rows = {(r["method"], r["variant"], r["k"]): r for r in headline(results_rows(np.random.default_rng(1))).filter(
        pl.col("setting") == "paraphrased").iter_rows(named=True)}  # fmt: skip
    assert method_run_name(rows[("greedy", None, None)]) == "greedy · paraphrased"
    assert method_run_name(rows[("projection", "sjlt", 64)]) == "sjlt k=64 · paraphrased"
    assert method_run_name(rows[("bm25", "prompt", None)]) == "bm25 prompt · paraphrased"
    assert method_run_name(rows[("greedy_budget", "budget 0.2", None)]) == "greedy_budget 0.2 · paraphrased"
    greedy = method_params(rows[("greedy", None, None)])
    assert greedy["approach"] == "select" and "k" not in greedy and "budget" not in greedy
    assert greedy["n_components"] == 2.33 and greedy["dim"] == 300  # a mean over splits, rounded
    sjlt = method_params(rows[("projection", "sjlt", 64)])
    assert sjlt["approach"] == "project" and sjlt["k"] == 64 and sjlt["n_components"] == 6.33
    bm25 = method_params(rows[("bm25", "prompt", None)])
    assert bm25["approach"] == "baseline" and not {"dim", "n_components", "components", "k"} & set(bm25)
