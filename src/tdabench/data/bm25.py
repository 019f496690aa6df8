"""Okapi BM25 over training texts: the text baseline every method is compared with, and the scores
behind the published protocol's candidate sets (tdabench.candidates).

Config `evaluation.bm25` picks the variant and the tokenizer (both with k1 = 1.5, b = 0.75):
  lucene  idf ln(1 + (N - n + 0.5) / (n + 0.5)) (never negative); each distinct query term once.
  okapi   `rank_bm25.BM25Okapi` with its defaults, as the paper ran it: idf
          ln((N - n + 0.5) / (n + 0.5)), a negative idf floored to 0.25 x the mean idf; a query
          term counts each time it occurs. Same operations in the same order as rank_bm25, so the
          scores are the package's (tests/test_bm25.py compares them).
  words       lower-cased word characters (`\\w+`): "born?" and "born" are one token.
  whitespace  `str.split()`, case kept (the paper's).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from tdabench.sections import BM25Config

K1, B = 1.5, 0.75  # rank_bm25's defaults, used by the paper
OKAPI_EPSILON = 0.25  # floor of a negative idf, as a share of the mean idf (rank_bm25's default)
VARIANTS = ("lucene", "okapi")
TOKENIZERS = ("words", "whitespace")
_WORD = re.compile(r"\w+")


def tokenize(text: str, tokenizer: str = "words") -> list[str]:
    if tokenizer == "whitespace":
        return text.split()
    return _WORD.findall(text.lower())


def bm25_scores(queries: Sequence[str], documents: Sequence[str], cfg: BM25Config) -> np.ndarray:
    """BM25 score of every document for every query -> [Q, T] float64."""
    if cfg.variant not in VARIANTS or cfg.tokenizer not in TOKENIZERS:
        raise ValueError(
            f"BM25 variant {cfg.variant!r} / tokenizer {cfg.tokenizer!r}: allowed variants "
            f"{', '.join(VARIANTS)}, tokenizers {', '.join(TOKENIZERS)} (config key evaluation.bm25)"
        )
    docs = [Counter(tokenize(d, cfg.tokenizer)) for d in documents]
    query_terms = [tokenize(q, cfg.tokenizer) for q in queries]
    if cfg.variant == "okapi":
        return _okapi(query_terms, docs)
    return _lucene(query_terms, docs)


def _lucene(queries: list[list[str]], docs: list[Counter]) -> np.ndarray:
    lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
    avg = lengths.mean() if len(docs) else 0.0
    df = Counter(t for d in docs for t in d)
    n = len(docs)
    # math.log, not np.log: numpy's vector log differs in the last bit between AVX2 and AVX-512 CPUs
    idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
    norm = K1 * (1 - B + B * lengths / max(avg, 1e-9))  # [T]
    out = np.zeros((len(queries), n))
    for qi, terms in enumerate(queries):
        # Distinct terms in first-occurrence order: a set's order follows PYTHONHASHSEED, and the
        # float sums (hence score ties and BM25 candidates) would vary from run to run.
        for term in dict.fromkeys(terms):
            if term not in idf:
                continue
            tf = np.array([d.get(term, 0) for d in docs], dtype=np.float64)
            out[qi] += idf[term] * tf * (K1 + 1) / (tf + norm)
    return out


def _okapi(queries: list[list[str]], docs: list[Counter]) -> np.ndarray:
    """rank_bm25.BM25Okapi(corpus).get_scores(query) for every query (its arithmetic, in its order)."""
    n = len(docs)
    if not any(docs):  # rank_bm25 divides by zero here (no term, zero mean length)
        raise ValueError("BM25 okapi: the training texts have no tokens (every prompt is empty)")
    doc_len = np.array([sum(d.values()) for d in docs])  # [T] int, like the package's list
    avgdl = int(doc_len.sum()) / n
    df: dict[str, int] = {}  # first-seen order: the order rank_bm25 sums the mean idf in
    for d in docs:
        for term in d:
            df[term] = df.get(term, 0) + 1
    idf, idf_sum, negative = {}, 0.0, []
    for term, f in df.items():
        idf[term] = math.log(n - f + 0.5) - math.log(f + 0.5)
        idf_sum += idf[term]
        if idf[term] < 0:
            negative.append(term)
    floor = OKAPI_EPSILON * (idf_sum / len(idf))
    for term in negative:
        idf[term] = floor
    norm = K1 * (1 - B + B * doc_len / avgdl)  # [T]
    out = np.zeros((len(queries), n))
    for qi, terms in enumerate(queries):
        for term in terms:  # every occurrence
            if not idf.get(term):  # unknown (or zero idf): the package adds 0
                continue
            tf = np.array([d.get(term, 0) for d in docs])
            out[qi] += idf[term] * (tf * (K1 + 1) / (tf + norm))
    return out


def top_ranked(scores: np.ndarray, b: int) -> np.ndarray:
    """Per query the `b` best documents by score, ties: lower index first -> [Q, b]."""
    return np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :b]


def top_candidates(scores: np.ndarray, sources: np.ndarray, b: int) -> np.ndarray:
    """The published candidate protocol: per query the top `b` documents by score (ties: lower
    index first), with the source forced into the last slot when it is not among them -> [Q, b]."""
    order = top_ranked(scores, b)
    missing = ~(order == sources[:, None]).any(1)
    order[missing, -1] = sources[missing]
    return order
