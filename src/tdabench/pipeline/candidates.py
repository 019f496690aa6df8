"""Stage `bm25_candidates`: the BM25 candidate sets of every query, written once for every stage
that ranks within them (tdabench.candidates)."""

from __future__ import annotations

import logging

import polars as pl

from tdabench.candidates import build_candidates, write_candidates
from tdabench.contracts import CandidatesParams
from tdabench.data.sources import read_queries, read_train
from tdabench.pipeline.common import JobContext

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(CandidatesParams)
    train = read_train(job.input["train"])
    queries = read_queries(job.input["queries"])
    table = build_candidates(train, queries, p.settings, p.b, p.bm25)
    write_candidates(table, job.output["candidates"])
    forced = table.group_by("setting", maintain_order=True).agg(pl.col("forced").sum(), pl.col("query_id").n_unique())
    for setting, n_forced, n_queries in forced.iter_rows():
        log.info(
            "%s: %d queries x %d candidates (BM25 %s, %s tokens); source forced in for %d",
            setting,
            n_queries,
            p.b,
            p.bm25.variant,
            p.bm25.tokenizer,
            n_forced,
        )
        mlrun.log_metrics({f"{setting}.forced": n_forced, f"{setting}.n_queries": n_queries})
