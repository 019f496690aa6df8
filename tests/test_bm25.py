import math

import numpy as np

from tdabench.data.bm25 import bm25_scores, tokenize, top_candidates


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


def test_bm25_matches_the_formula():
    docs = ["Where was Kalo born?", "Who employs Kalo Ren?", "Which pet does Sa Dun have?", "born born in Oslo"]
    queries = ["Kalo born", "what pet", "nothing matches"]
    got = bm25_scores(queries, docs)
    for q, row in zip(queries, got):
        np.testing.assert_allclose(row, naive_bm25(q, docs))
    assert (got[2] == 0).all()


def test_candidates_force_the_source_into_the_last_slot():
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 5.0]])
    cands = top_candidates(scores, sources=np.array([3, 2]), b=2)
    assert cands.tolist() == [[0, 3], [2, 3]]  # query 0: source 3 forced in; query 1: tie -> lower index first
