import math
from collections import Counter

import numpy as np
import polars as pl
import pytest

from tdabench.candidates import CandidateError, build_candidates, candidate_rows, read_candidates, write_candidates
from tdabench.data.bm25 import bm25_scores, tokenize, top_candidates
from tdabench.sections import BM25Config

from helpers import assert_papers_set, papers_candidates

LUCENE = BM25Config("lucene", "words", "prompt")
OKAPI = BM25Config("okapi", "whitespace", "prompt")


def naive_bm25(query, docs, k1=1.5, b=0.75):
    toks = [tokenize(d) for d in docs]
    avg = sum(map(len, toks)) / len(toks)
    out = []
    for d in toks:
        s = 0.0
        for term in set(tokenize(query)):
            n_t = sum(term in t for t in toks)
            if n_t == 0:
                continue
            idf = math.log(1 + (len(toks) - n_t + 0.5) / (n_t + 0.5))
            tf = d.count(term)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return out


def test_lucene_bm25_matches_the_formula():
    docs = ["Where was Kalo born?", "Who employs Kalo Ren?", "Which pet does Sa Dun have?", "born born in Oslo"]
    queries = ["Kalo born", "what pet", "nothing matches"]
    got = bm25_scores(queries, docs, LUCENE)
    for q, row in zip(queries, got):
        np.testing.assert_allclose(row, naive_bm25(q, docs))
    assert (got[2] == 0).all()


def random_corpus(seed: int, n_docs: int, n_queries: int):
    """Texts over a small vocabulary with case and punctuation variants: frequent words (in more
    than half the documents: negative okapi idf), repeated terms, empty-ish documents, query terms
    the corpus lacks."""
    rng = np.random.default_rng(seed)
    vocab = ["the", "The", "a", "fact", "fact?", "Oslo", "oslo,", "born", "pet", "cat", "dog.", "Kalo", "Ren"]
    vocab += [f"w{i}" for i in range(40)]
    weights = np.r_[np.full(3, 12.0), np.ones(len(vocab) - 3)]
    weights /= weights.sum()

    def text(lo, hi):
        return " ".join(rng.choice(vocab, size=rng.integers(lo, hi), p=weights))

    docs = [text(1, 25) for _ in range(n_docs)]
    queries = [text(1, 8) + (" unseen" if i % 3 == 0 else "") for i in range(n_queries)]
    return docs, queries


@pytest.mark.parametrize("seed", range(4))
def test_okapi_variant_equals_rank_bm25(seed):
    rank_bm25 = pytest.importorskip("rank_bm25")
    docs, queries = random_corpus(seed, n_docs=30 + 7 * seed, n_queries=12)
    reference = rank_bm25.BM25Okapi([d.split() for d in docs])
    df = Counter(t for d in docs for t in set(d.split()))
    assert any(f > len(docs) / 2 for f in df.values())  # some idf is negative: the floor is exercised
    got = bm25_scores(queries, docs, OKAPI)
    want = np.stack([reference.get_scores(q.split()) for q in queries])
    np.testing.assert_array_equal(got, want)  # the package's operations in its order: equal bits
    # and with the other tokenizer: rank_bm25 over the same tokens
    reference = rank_bm25.BM25Okapi([tokenize(d) for d in docs])
    got = bm25_scores(queries, docs, BM25Config("okapi", "words", "prompt"))
    np.testing.assert_array_equal(got, np.stack([reference.get_scores(tokenize(q)) for q in queries]))


def test_the_variants_differ_where_the_paper_differs():
    docs = ["a a b", "a c", "a d", "e f"]  # "a" in 3 of 4 documents: negative okapi idf, floored
    okapi = bm25_scores(["a a"], docs, OKAPI)[0]
    once = bm25_scores(["a"], docs, OKAPI)[0]
    np.testing.assert_allclose(okapi, 2 * once)  # a repeated query term counts twice in okapi ...
    lucene = bm25_scores(["a a"], docs, BM25Config("lucene", "whitespace", "prompt"))[0]
    np.testing.assert_array_equal(
        lucene, bm25_scores(["a"], docs, BM25Config("lucene", "whitespace", "prompt"))[0]
    )  # ... once
    assert (once[:3] > 0).all() and once[3] == 0  # floored to a positive share of the mean idf
    assert tokenize("Born? born", "whitespace") == ["Born?", "born"] and tokenize("Born? born") == ["born", "born"]


def test_an_unknown_variant_and_empty_texts_are_named():
    with pytest.raises(ValueError, match="every prompt is empty"):
        bm25_scores(["a"], ["", " "], OKAPI)
    with pytest.raises(ValueError, match="BM25 variant 'bm42'.*lucene, okapi"):
        bm25_scores(["a"], ["a"], BM25Config("bm42", "words", "prompt"))


def test_candidates_force_the_source_into_the_last_slot():
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 5.0]])
    cands = top_candidates(scores, sources=np.array([3, 2]), b=2)
    assert cands.tolist() == [[0, 3], [2, 3]]  # query 0: source 3 forced in; query 1: tie -> lower index first


def tables(seed=0, n_train=40, n_queries=15):
    docs, prompts = random_corpus(seed, n_train, n_queries)
    train = pl.DataFrame({"id": [f"lima_{3 * i + 7}" for i in range(n_train)], "prompt": docs, "response": docs})
    rng = np.random.default_rng(seed + 1)
    sources = rng.choice(train["id"].to_list(), size=n_queries, replace=False).tolist()
    rows = []
    for setting in ("paraphrased", "model_generated"):  # the same prompts in both settings, as in LIMA
        rows += [
            {"id": f"q{i}", "source_id": s, "setting": setting, "prompt": p, "response": "r"}
            for i, (s, p) in enumerate(zip(sources, prompts))
        ]
    return train, pl.DataFrame(rows)


def test_candidate_table_is_the_papers_top5_with_the_source_forced_in(tmp_path):
    """Against the paper's code path (tests/helpers.papers_candidates); queries whose 5th and 6th
    scores tie are skipped: there the paper's order is numpy's unstable sort, ours the lower row."""
    pytest.importorskip("rank_bm25")
    train, queries = tables()
    table = build_candidates(train, queries, ["paraphrased", "model_generated"], 5, OKAPI)
    write_candidates(table, tmp_path / "c.parquet")
    table = read_candidates(tmp_path / "c.parquet")
    ids = train["id"].to_list()
    checked = 0
    for q in queries.filter(pl.col("setting") == "paraphrased").iter_rows(named=True):
        paper = papers_candidates(train["prompt"].to_list(), q["prompt"], ids.index(q["source_id"]))
        if paper is None:
            continue
        got = table.filter((pl.col("setting") == "paraphrased") & (pl.col("query_id") == q["id"])).sort("slot")
        assert_papers_set(got, paper, ids)
        checked += 1
    assert checked >= 10
    both = table.pivot(on="setting", index=["query_id", "slot"], values="train_id")
    assert both["paraphrased"].to_list() == both["model_generated"].to_list()  # shared candidate sets
    rows = candidate_rows(table, "paraphrased", ["q3", "q0"], ids, "c.parquet")  # [2, 5], in query order
    assert rows.shape == (2, 5)
    assert [ids[i] for i in rows[1]] == table.filter(
        (pl.col("query_id") == "q0") & (pl.col("setting") == "paraphrased")
    )["train_id"].to_list()


def test_candidate_errors_name_the_problem():
    train, queries = tables(n_train=12, n_queries=6)
    with pytest.raises(CandidateError, match="evaluation.candidates is 13, but the training set has 12 examples"):
        build_candidates(train, queries, ["paraphrased"], 13, LUCENE)
    orphan = queries.with_columns(
        pl.when(pl.col("id") == "q2").then(pl.lit("lima_9999")).otherwise("source_id").alias("source_id")
    )
    with pytest.raises(CandidateError, match="query 'q2' \\(setting paraphrased\\) has source_id 'lima_9999'"):
        build_candidates(train, orphan, ["paraphrased"], 5, LUCENE)
    table = build_candidates(train, queries, ["paraphrased"], 5, LUCENE)
    with pytest.raises(CandidateError, match="no candidates for query 'q9' of setting paraphrased"):
        candidate_rows(table, "paraphrased", ["q0", "q9"], train["id"].to_list(), "c.parquet")
    with pytest.raises(CandidateError, match="is not a training example id"):
        candidate_rows(table, "paraphrased", ["q0"], train["id"].to_list()[:3], "c.parquet")


def test_verify_checks_the_candidate_table(tmp_path):
    from tdabench.verify import verify

    train, queries = tables(n_train=12, n_queries=6)
    path = tmp_path / "data" / "bm25_candidates.parquet"
    path.parent.mkdir()
    table = build_candidates(train, queries, ["paraphrased"], 4, LUCENE)
    write_candidates(table, path)
    assert verify([tmp_path]) == (1, [])
    source = table.filter(pl.col("query_id") == "q1")["source_id"][0]
    others = set(train["id"].to_list()) - set(table.filter(pl.col("query_id") == "q1")["train_id"].to_list())
    lost = (pl.col("query_id") == "q1") & (pl.col("train_id") == source)  # q1's source swapped for another
    broken = table.with_columns(pl.when(lost).then(pl.lit(sorted(others)[0])).otherwise("train_id").alias("train_id"))
    write_candidates(broken, path)
    n, problems = verify([tmp_path])
    assert len(problems) == 1 and "query 'q1' of setting paraphrased" in problems[0] and str(path) in problems[0]


def test_queried_with_the_paraphrased_prompt_every_setting_gets_the_paraphrased_sets():
    train, queries = tables(n_train=30, n_queries=10)
    other = queries.with_columns(  # model-generated queries whose prompts are not the paraphrased ones
        pl.when(pl.col("setting") == "model_generated")
        .then(pl.lit("w1 w2 w3 fact?"))
        .otherwise("prompt")
        .alias("prompt")
    )
    settings = ["paraphrased", "model_generated"]

    def sets(table, setting):
        return table.filter(pl.col("setting") == setting).sort("source_id", "slot")["train_id"].to_list()

    own = build_candidates(train, other, settings, 5, LUCENE)
    assert sets(own, "model_generated") != sets(own, "paraphrased")
    paper = build_candidates(train, other, settings, 5, BM25Config("lucene", "words", "paraphrased_prompt"))
    assert sets(paper, "model_generated") == sets(paper, "paraphrased") == sets(own, "paraphrased")
    orphan = other.filter(~((pl.col("setting") == "paraphrased") & (pl.col("id") == "q3")))
    with pytest.raises(CandidateError, match="query 'q3' .setting model_generated. has source .* which no paraphrased"):
        build_candidates(train, orphan, settings, 5, BM25Config("lucene", "words", "paraphrased_prompt"))
