"""The similarity store from the gradient cache (`similarity.source: cache`): dot products and
squared norms of stored per-sample gradients, component by component, in float64.

Memory: one component's query gradients plus `block_rows` training rows at a time. A unit of the
store's writer is one component; a failed job starts over (the inputs are files that may be
rebuilt, so a partial store is not resumed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tdabench.metrics import matmul64
from tdabench.producer import Report, SimilarityProducer, Target, ground_truth
from tdabench.similarity import SimilarityWriter
from tdabench.store import GradientStore


class CacheProducer(SimilarityProducer):
    """Dot products of the gradients in two gradient stores (training and query examples)."""

    source = "cache"

    def __init__(self, train: GradientStore, queries: GradientStore, block_rows: int = 1024):
        if train.attrs.get("model_fingerprint") != queries.attrs.get("model_fingerprint"):
            raise ValueError("train and query gradients come from different models (model_fingerprint differs)")
        if train.components != queries.components:
            raise ValueError("train and query gradient stores hold different components")
        self.train, self.queries, self.block_rows = train, queries, block_rows

    def target(
        self,
        query_ids: Sequence[str],
        source_ids: Sequence[str],
        attrs: dict,
        candidates: np.ndarray | None = None,
        dtype: str = "float64",
    ) -> Target:
        """The store of `query_ids` (rows of the query store) against every training row, each
        query's source example given by id."""
        truth = ground_truth(self.train.sample_ids, source_ids)
        return Target(list(query_ids), list(self.train.sample_ids), truth, candidates, attrs, dtype)

    def write(self, out: str | Path, target: Target, progress=None) -> Report:
        start = time.perf_counter()
        train, queries, candidates = self.train, self.queries, target.candidates
        if list(target.train_ids) != list(train.sample_ids):
            raise ValueError("the target's train_ids are not the training gradient store's sample ids")
        row_of = {s: i for i, s in enumerate(queries.sample_ids)}
        missing = [q for q in target.query_ids if q not in row_of]
        if missing:
            raise KeyError(f"query ids missing from the query gradient store: {missing[:5]}")
        q_rows = np.array([row_of[q] for q in target.query_ids], dtype=np.int64)
        info = train.component_info
        n_q = len(q_rows)
        params = [int(np.prod(c["shape"])) for c in info]
        dims = [train.dim(c["name"]) for c in info]
        header = target.header(
            self.source,
            components=[c["name"] for c in info],
            component_params=params,
            component_family=[c["family"] for c in info],
            component_layer=[-1 if c["layer"] is None else c["layer"] for c in info],
            component_dim=dims,
            component_method=["exact" if d == p else "countsketch" for p, d in zip(params, dims)],
            component_way=["cache"] * len(info),
        )
        header.attrs["model_fingerprint"] = train.attrs.get("model_fingerprint", "")
        with SimilarityWriter(out, header, len(info), target.dtype, resume=False) as writer:
            for ci, c in enumerate(info):
                one = slice(ci, ci + 1)  # this component's rows of the store
                gq = queries.read(c["name"], q_rows).astype(np.float64)  # [Q, d_c]
                writer.put(slice(None), None, query_sqnorm=(gq * gq).sum(1)[None], components=one)
                pair_dots = None if candidates is None else np.zeros((n_q, candidates.shape[1]))  # [Q, b]
                for begin, block in train.iter_blocks(c["name"], self.block_rows):
                    gt = block.astype(np.float64)  # [B, d_c]
                    rows = slice(begin, begin + len(gt))
                    dot = None
                    if candidates is None:
                        dot = matmul64(gq, gt.T)[None]  # [1, Q, B]
                    else:
                        q_idx, j_idx = np.nonzero((candidates >= rows.start) & (candidates < rows.stop))
                        pair_dots[q_idx, j_idx] = np.einsum(
                            "pd,pd->p", gq[q_idx], gt[candidates[q_idx, j_idx] - rows.start]
                        )
                    sq = (gt * gt).sum(1)[None]  # [1, B]
                    writer.put(slice(None), dot, rows, train_rows=rows, train_sqnorm=sq, components=one)
                if pair_dots is not None:
                    writer.put(slice(None), pair_dots[None], components=one)
                writer.mark(ci)
                if progress is not None:
                    progress.update(1)
        return Report(n_units=len(info), seconds=time.perf_counter() - start)


def build_similarity(
    train: GradientStore,
    queries: GradientStore,
    query_ids: Sequence[str],
    source_ids: Sequence[str],
    out_path: str | Path,
    setting: str,
    block_rows: int = 1024,
    dtype: str = "float64",
    candidates: np.ndarray | None = None,
    progress=None,
) -> None:
    """`CacheProducer` in one call: the store of `query_ids` (rows of `queries`) against the
    training rows, optionally only the `candidates` [Q, b] pairs."""
    producer = CacheProducer(train, queries, block_rows)
    target = producer.target(query_ids, source_ids, {"setting": setting}, candidates, dtype)
    producer.write(out_path, target, progress)
