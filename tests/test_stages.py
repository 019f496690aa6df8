"""Stage entry points on tiny inputs: hand-built gradient stores and benchmark tables run through
similarity -> selection -> projection / project_selected -> evaluate, exactly as Snakemake would
call them (JobContext), checked against the brute-force ranking."""

import numpy as np
import polars as pl
import pytest

from tdabench.components import describe
from tdabench.contracts import ContractError
from tdabench.costs_table import COSTS_SCHEMA, write_costs
from tdabench.data.sources import write_queries, write_train
from tdabench.evaluate import read_results
from tdabench.pipeline.common import JobContext, run_rule
from tdabench.projection_files import read_projections
from tdabench.selection import SelectionTable
from tdabench.store import GradientStoreWriter

from helpers import brute_force_ranks

N_T, N_Q, DIMS = 12, 10, (6, 3, 5)
B = 4  # BM25 candidates per query
NAMES = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(len(DIMS))]
# budget 1e-4: smaller than any component, so it has no result (and the summary says so)
SELECTION = {"selection_fraction": 0.5, "n_splits": 2, "split_seed": 0, "objective": "mrr", "budgets": [0.5, 1e-4]}


def write_store(path, ids, grads):
    comps = [describe(n, (g.shape[1],)) for n, g in zip(NAMES, grads)]
    with GradientStoreWriter(path, ids, comps, "float32", {"model_fingerprint": "test"}) as w:
        w.write(slice(0, len(ids)), {n: g for n, g in zip(NAMES, grads)})


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(0)
    gt = rng.integers(0, N_T, N_Q)
    tg = [rng.standard_normal((N_T, d)).astype(np.float32) for d in DIMS]
    # The first component carries the source signal; the others mostly noise.
    qg = [(rng.standard_normal((N_Q, d)) + w * t[gt]).astype(np.float32) for t, d, w in zip(tg, DIMS, (1.5, 0.1, 0.3))]
    # Prompts for BM25: a query shares its source's word when its index is even (BM25 finds it),
    # another example's otherwise (the source is forced into the candidates).
    train = pl.DataFrame(
        {
            "id": [f"t{i}" for i in range(N_T)],
            "prompt": [f"about w{i} and more" for i in range(N_T)],
            "response": ["r"] * N_T,
            "role": ["planted"] * N_T,
        }
    )
    queries = pl.DataFrame(
        {
            "id": [f"q{i}" for i in range(N_Q)],
            "source_id": [f"t{g}" for g in gt],
            "setting": ["paraphrased"] * N_Q,
            "prompt": [f"w{g if i % 2 == 0 else (g + 1) % N_T}" for i, g in enumerate(gt)],
            "response": ["r"] * N_Q,
        }
    )
    p = {
        k: str(root / v)
        for k, v in {
            "train": "train.parquet",
            "queries": "queries.parquet",
            "tstore": "train.h5",
            "qstore": "queries.h5",
            "sim": "sim.h5",
            "sel": "sel.parquet",
            "proj": "sjlt.h5",
            "stp": "stp.h5",
            "costs": "costs.parquet",
            "bm25": "bm25_candidates.parquet",
        }.items()
    }
    write_train(train, p["train"])
    write_queries(queries, p["queries"])
    write_store(p["tstore"], train["id"].to_list(), tg)
    write_store(p["qstore"], queries["id"].to_list(), qg)
    write_costs(pl.DataFrame(schema=COSTS_SCHEMA), p["costs"])

    def job(rule, inputs, outputs, params, **wildcards):
        run_rule(JobContext(rule, inputs, outputs, params, wildcards))

    job(
        "similarity",
        {"train": [p["tstore"]], "query_grads": [p["qstore"]], "queries": p["queries"], "bm25_candidates": []},
        {"similarity": p["sim"]},
        {"block_rows": 5, "dtype": "float64", "layout": "dense"},
        setting="paraphrased",
    )
    job("selection", {"similarity": p["sim"]}, {"selection": p["sel"]}, SELECTION, setting="paraphrased")
    proj = {"dims": [4, 8], "seeds": [0, 1], "nonzeros": 1}
    job(
        "projection",
        {"train": [p["tstore"]], "query_grads": [p["qstore"]]},
        {"projection": p["proj"]},
        proj,
        method="sjlt",
    )
    job(
        "project_selected",
        {"train": [p["tstore"]], "query_grads": [p["qstore"]], "selection": p["sel"]},
        {"projection": p["stp"]},
        {**proj, "select_kind": "sjlt"},
        setting="paraphrased",
    )
    outputs = {k: str(root / f"{k}.parquet") for k in ("metrics", "candidates", "in_sample", "per_query")}
    evaluation = {
        "settings": ["paraphrased"],
        "recall_at": [1, 5],
        "candidates": B,
        "bm25": {"variant": "lucene", "tokenizer": "words", "query": "prompt"},
        "bootstrap": 100,
        "bootstrap_seed": 0,
        **{k: SELECTION[k] for k in ("selection_fraction", "n_splits", "split_seed")},
    }
    bm25 = {"variant": "lucene", "tokenizer": "words", "query": "prompt"}
    job(
        "bm25_candidates",
        {"train": p["train"], "queries": p["queries"]},
        {"candidates": p["bm25"]},
        {"settings": ["paraphrased"], "b": B, "bm25": bm25},
    )
    job(
        "evaluate",
        {
            "train": p["train"],
            "queries": p["queries"],
            "similarity": [p["sim"]],
            "selection": [p["sel"]],
            "projection": [p["proj"]],
            "selected": [p["stp"]],
            "costs": p["costs"],
            "bm25_candidates": [p["bm25"]],
        },
        outputs,
        evaluation,
    )
    return p, outputs, qg, tg, gt


def test_selection_stage_chooses_what_brute_force_chooses(case):
    p, _, qg, tg, gt = case
    from tdabench.selection import split_queries

    table = SelectionTable.read(p["sel"])
    assert table.splits == [0, 1]
    for split in table.splits:
        sel, _ = split_queries([f"q{i}" for i in range(N_Q)], 0.5, split)
        mrr = [np.mean(1 / brute_force_ranks(qg, tg, gt, [c], sel)) for c in range(len(DIMS))]
        best = max(range(len(DIMS)), key=lambda c: (round(mrr[c], 12), -DIMS[c], -c))
        assert table.best_single(split) == [NAMES[best]]
        assert sorted(table.greedy_order(split)) == sorted(NAMES)  # run to the end
        assert 1 <= table.greedy_chosen_steps(split) <= len(DIMS)


def test_evaluate_stage_scores_held_out_queries_like_brute_force(case):
    p, outputs, qg, tg, gt = case
    from tdabench.selection import split_queries

    metrics = read_results(outputs["metrics"])
    for split in (0, 1):
        _, held = split_queries([f"q{i}" for i in range(N_Q)], 0.5, split)
        rows = metrics.filter(pl.col("split") == split)
        full = rows.filter(pl.col("method") == "full").row(0, named=True)
        ranks = brute_force_ranks(qg, tg, gt, range(len(DIMS)), held)
        assert full["top1"] == pytest.approx(np.mean(ranks == 1)) and full["mrr"] == pytest.approx(np.mean(1 / ranks))
        chosen = SelectionTable.read(p["sel"]).greedy_set(split)
        greedy = rows.filter(pl.col("method") == "greedy").row(0, named=True)
        ranks = brute_force_ranks(qg, tg, gt, [NAMES.index(c) for c in chosen], held)
        assert greedy["mrr"] == pytest.approx(np.mean(1 / ranks))
    projected = metrics.filter(pl.col("method") == "projection")
    assert sorted(set(projected["k"].to_list())) == [4, 8] and set(projected["seed"].to_list()) == {0, 1}


def test_a_budget_no_component_fits_has_no_rows_and_is_named_as_unmet(case):
    from tdabench.evaluate import unmet_budgets

    _, outputs, _, _, _ = case
    metrics = read_results(outputs["metrics"])
    assert set(metrics.filter(pl.col("method") == "greedy_budget")["budget"]) == {0.5}
    assert unmet_budgets(metrics, SELECTION["budgets"]) == [1e-4]


def test_evaluate_stage_ranks_within_the_candidate_table(case):
    """The candidate protocol reads the one candidate table: full-gradient ranks within each
    query's sets, as the brute-force loop over the same sets gives them."""
    from tdabench.candidates import candidate_rows, read_candidates
    from tdabench.selection import split_queries

    p, outputs, qg, tg, gt = case
    table = read_candidates(p["bm25"])
    ids = [f"q{i}" for i in range(N_Q)]
    sets = candidate_rows(table, "paraphrased", ids, [f"t{i}" for i in range(N_T)], p["bm25"])  # [Q, B]
    assert sets.shape == (N_Q, B) and all(gt[q] in sets[q] for q in range(N_Q))
    forced = table.filter(pl.col("forced"))["query_id"].to_list()
    assert forced and set(forced) <= {f"q{i}" for i in range(1, N_Q, 2)}  # the queries without their source's word
    candidates = read_results(outputs["candidates"])
    for split in (0, 1):
        _, held = split_queries(ids, 0.5, split)
        full = candidates.filter((pl.col("split") == split) & (pl.col("method") == "full")).row(0, named=True)
        ranks = brute_force_ranks(qg, tg, gt, range(len(DIMS)), held, candidates=sets)
        assert full["top1"] == pytest.approx(np.mean(ranks == 1)) and full["mrr"] == pytest.approx(np.mean(1 / ranks))


def test_projection_files_hold_every_k_seed_and_split(case):
    p, *_ = case
    full = read_projections(p["proj"], [f"q{i}" for i in range(N_Q)])
    assert sorted((x.k, x.seed) for x in full) == [(4, 0), (4, 1), (8, 0), (8, 1)]
    assert all(x.train.shape == (N_T, x.k) and x.queries.shape == (N_Q, x.k) and x.split is None for x in full)
    reversed_ids = [f"q{i}" for i in reversed(range(N_Q))]  # rows follow the ids asked for
    again = read_projections(p["proj"], reversed_ids)
    np.testing.assert_array_equal(again[0].queries, full[0].queries[::-1])
    selected = read_projections(p["stp"], [f"q{i}" for i in range(N_Q)])
    table = SelectionTable.read(p["sel"])
    for x in selected:
        assert list(x.components) == table.greedy_set(x.split)
        assert x.k < sum(DIMS[NAMES.index(c)] for c in x.components)  # k >= selected dim is skipped


def test_typed_params_refuse_a_missing_or_unknown_key(tmp_path):
    with pytest.raises(ContractError, match=r"missing \['budgets'\]"):
        run_rule(
            JobContext(
                "selection",
                {"similarity": "x"},
                {"selection": str(tmp_path / "s.parquet")},
                {k: v for k, v in SELECTION.items() if k != "budgets"},
                {"setting": "s"},
            )
        )
    with pytest.raises(ContractError, match=r"unknown \['extra'\]"):
        run_rule(
            JobContext(
                "selection",
                {"similarity": "x"},
                {"selection": str(tmp_path / "s.parquet")},
                {**SELECTION, "extra": 1},
                {"setting": "s"},
            )
        )
    assert not (tmp_path / "s.parquet").exists()


def test_in_sample_table_scores_every_query_with_the_methods_that_choose_nothing(case):
    """The paper's metric: all queries at once (split -1), full gradient and single components
    against the brute-force loop, whole corpus and within the candidates; nothing chosen on queries."""
    from tdabench.candidates import candidate_rows, read_candidates

    p, outputs, qg, tg, gt = case
    table = read_results(outputs["in_sample"])
    assert set(table["split"]) == {-1} and set(table["n_queries"]) == {N_Q}
    assert not {"best_single", "greedy", "greedy_step", "greedy_budget", "select_then_project"} & set(table["method"])
    every = range(N_Q)
    sets = candidate_rows(
        read_candidates(p["bm25"]), "paraphrased", [f"q{i}" for i in every], [f"t{i}" for i in range(N_T)], "c"
    )
    for protocol, cands in (("corpus", None), ("candidates", sets)):
        rows = table.filter(pl.col("protocol") == protocol)
        full = rows.filter(pl.col("method") == "full").row(0, named=True)
        ranks = brute_force_ranks(qg, tg, gt, range(len(DIMS)), every, candidates=cands)
        assert full["top1"] == pytest.approx(np.mean(ranks == 1)) and full["mrr"] == pytest.approx(np.mean(1 / ranks))
        for c, name in enumerate(NAMES):
            single = rows.filter((pl.col("method") == "single") & (pl.col("n_components") == 1)).row(c, named=True)
            ranks = brute_force_ranks(qg, tg, gt, [c], every, candidates=cands)
            assert single["top1"] == pytest.approx(np.mean(ranks == 1)), name
    assert set(table.filter(pl.col("method") == "projection")["k"]) == {4, 8}  # projections of the full gradient
