"""Okapi BM25 over training texts: the text baseline every method is compared with.

Tokens: lower-cased word characters (`\\w+`), so "born?" and "born" are the same token.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def bm25_scores(queries: list[str], documents: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 score of every document for every query -> [Q, T] float64."""
    docs = [Counter(tokenize(d)) for d in documents]
    lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
    avg = lengths.mean() if len(docs) else 0.0
    df = Counter(t for d in docs for t in d)
    n = len(docs)
    # math.log, not np.log: numpy's vector log differs in the last bit between AVX2 and AVX-512 CPUs
    idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
    norm = k1 * (1 - b + b * lengths / max(avg, 1e-9))  # [T]
    out = np.zeros((len(queries), n))
    for qi, q in enumerate(queries):
        # Distinct terms in first-occurrence order: a set's order follows PYTHONHASHSEED, and the
        # float sums (hence score ties and BM25 candidates) would vary from run to run.
        for term in dict.fromkeys(tokenize(q)):
            if term not in idf:
                continue
            tf = np.array([d.get(term, 0) for d in docs], dtype=np.float64)
            out[qi] += idf[term] * tf * (k1 + 1) / (tf + norm)
    return out


def bm25_candidates(queries: Sequence[str], documents: Sequence[str], sources: np.ndarray, b: int | None) -> np.ndarray:
    """The published protocol's candidates: per query the top b documents by BM25 over the
    training prompts, the source forced in -> [Q, b] (config key evaluation.candidates is b)."""
    if not b:
        raise ValueError("config key similarity.layout: candidates needs evaluation.candidates (b) set")
    scores = bm25_scores(list(queries), list(documents))
    return top_candidates(scores, sources, min(b, len(documents)))


def top_candidates(scores: np.ndarray, sources: np.ndarray, b: int) -> np.ndarray:
    """The published candidate protocol: per query the top `b` documents by score (ties: lower
    index first), with the source forced into the last slot when it is not among them -> [Q, b]."""
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :b]
    missing = ~(order == sources[:, None]).any(1)
    order[missing, -1] = sources[missing]
    return order
