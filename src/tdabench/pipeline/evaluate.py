"""Stage `evaluate`: the tidy results table over all settings, splits and methods."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from tdabench.candidates import CandidateError, candidate_rows, read_candidates
from tdabench.contracts import EvaluateParams
from tdabench.costs_table import read_costs
from tdabench.data.bm25 import bm25_scores
from tdabench.data.sources import read_queries, read_train
from tdabench.evaluate import IN_SAMPLE, Scoring, evaluate_split, tidy, write_per_query, write_results
from tdabench.pipeline.common import JobContext
from tdabench.projection_files import read_projections
from tdabench.selection import SelectionTable, split_queries
from tdabench.similarity import load_similarity

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(EvaluateParams)
    train = read_train(job.input["train"])
    queries = read_queries(job.input["queries"])
    costs = read_costs(job.input["costs"])
    selected = dict(zip(p.settings, job.input["selected"])) if job.input.get("selected") else {}
    rows, per_query, in_sample = [], [], []
    stores_in_candidate_layout = False
    scoring = Scoring(p.recall_at, p.bootstrap, p.bootstrap_seed)
    for setting, sim_path, sel_path in zip(p.settings, job.input["similarity"], job.input["selection"]):
        sim = load_similarity(sim_path)
        stores_in_candidate_layout = sim.candidates is not None
        selection = SelectionTable.read(sel_path)
        projections = [pr for path in job.input["projection"] for pr in read_projections(path, sim.query_ids)]
        if setting in selected:
            projections += read_projections(selected[setting], sim.query_ids)
        q = queries.filter(pl.col("setting") == setting)
        q = q[[{i: n for n, i in enumerate(q["id"].to_list())}[qid] for qid in sim.query_ids]]
        baselines = {
            "prompt": bm25_scores(q["prompt"].to_list(), train["prompt"].to_list(), p.bm25),
            "prompt_response": bm25_scores(
                (q["prompt"] + " " + q["response"]).to_list(),
                (train["prompt"] + " " + train["response"]).to_list(),
                p.bm25,
            ),
        }
        if sim.train_ids != train["id"].to_list():
            raise ValueError(f"{sim_path}: training ids differ from {job.input['train']}")
        candidates = None
        if p.candidates:  # the published protocol: rank within each query's BM25 candidates
            (path,) = job.input["bm25_candidates"]
            candidates = candidate_rows(read_candidates(path), setting, sim.query_ids, sim.train_ids, str(path))
            if sim.candidates is not None:  # the store holds only the candidates: the same sets
                if not np.array_equal(sim.candidates, candidates):
                    raise CandidateError(f"{sim_path} holds other candidate sets than {path}: rebuild it")
                candidates = None
        for split in range(p.n_splits):
            _, held = split_queries(sim.query_ids, p.selection_fraction, p.split_seed + split)
            r, pq = evaluate_split(sim, setting, split, held, selection, projections, baselines, scoring, candidates)
            rows += r
            per_query += pq
        every = np.arange(len(sim.query_ids))  # in-sample, as the paper reports: the methods that choose nothing
        in_sample += evaluate_split(sim, setting, IN_SAMPLE, every, None, projections, baselines, scoring, candidates)[
            0
        ]
    everything = tidy(rows, list(p.recall_at), costs)
    # The study's own protocol goes to metrics.parquet: whole-corpus ranking, or, with stores in the
    # candidate layout, ranking within the candidates; candidates.parquet holds the candidate
    # protocol beside whole-corpus ranking (dense layout; empty otherwise).
    own = "candidates" if stores_in_candidate_layout else "corpus"
    table = everything.filter(pl.col("protocol") == own)
    write_results(table, job.output["metrics"])
    write_results(everything.filter(pl.col("protocol") != own), job.output["candidates"])
    write_results(tidy(in_sample, list(p.recall_at), costs), job.output["in_sample"])
    write_per_query(per_query, job.output["per_query"])
    means = (
        table.filter(pl.col("method").is_in(["full", "greedy", "best_single"]))
        .group_by("setting", "method", maintain_order=True)
        .agg(pl.col("top1", "mrr").mean())
    )
    for r in means.iter_rows(named=True):
        log.info("%s %-11s top1 %.3f mrr %.3f (mean over splits)", r["setting"], r["method"], r["top1"], r["mrr"])
    mlrun.log_metrics({"n_rows": table.height})
