"""Stage `evaluate`: the tidy results table over all settings, splits and methods."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import polars as pl

from tdabench.data.bm25 import bm25_scores, top_candidates
from tdabench.evaluate import PER_QUERY_SCHEMA, Projected, Scoring, evaluate_split, tidy
from tdabench.io import write_parquet
from tdabench.pipeline.common import JobContext
from tdabench.selection import split_queries
from tdabench.similarity import load_similarity

log = logging.getLogger(__name__)


def _rows(f: h5py.File, query_ids: list[str]) -> list[int]:
    row_of = {s.decode(): i for i, s in enumerate(f["query_ids"][:])}
    return [row_of[q] for q in query_ids]


def load_projections(path: str, query_ids: list[str]) -> list[Projected]:
    """Every (k, seed) of one full-gradient projection file."""
    out = []
    with h5py.File(path, "r") as f:
        rows = _rows(f, query_ids)
        for kname, kgroup in f.items():
            if isinstance(kgroup, h5py.Group):
                for sname, g in kgroup.items():
                    out.append(Projected(str(f.attrs["method"]), int(kname[1:]), int(sname[4:]),
                                         g["train"][:], g["queries"][:][rows]))
    return out


def load_selected(path: str, query_ids: list[str]) -> list[Projected]:
    """Every (split, k, seed) of a select-then-project file."""
    out = []
    with h5py.File(path, "r") as f:
        rows = _rows(f, query_ids)
        for split_name, split in f.items():
            if not isinstance(split, h5py.Group):
                continue
            for kname, kgroup in split.items():
                for sname, g in kgroup.items():
                    out.append(Projected("select_then_project", int(kname[1:]), int(sname[4:]), g["train"][:],
                                         g["queries"][:][rows], split=int(split_name[5:]),
                                         components=tuple(json.loads(split.attrs["components"]))))
    return out


def main(job: JobContext, mlrun) -> None:
    p = job.params
    train = pl.read_parquet(job.input["train"])
    queries = pl.read_parquet(job.input["queries"])
    costs = pl.read_parquet(job.input["costs"])
    selected = dict(zip(p["settings"], job.input["selected"])) if job.input.get("selected") else {}
    rows, per_query = [], []
    scoring = Scoring(tuple(p["recall_at"]), p["bootstrap"], p["bootstrap_seed"])
    for setting, sim_path, sel_path in zip(p["settings"], job.input["similarity"], job.input["selection"]):
        sim = load_similarity(sim_path)
        selection = pl.read_parquet(sel_path)
        projections = [pr for path in job.input["projection"] for pr in load_projections(path, sim.query_ids)]
        if setting in selected:
            projections += load_selected(selected[setting], sim.query_ids)
        q = queries.filter(pl.col("setting") == setting)
        q = q[[{i: n for n, i in enumerate(q["id"].to_list())}[qid] for qid in sim.query_ids]]
        baselines = {
            "prompt": bm25_scores(q["prompt"].to_list(), train["prompt"].to_list()),
            "prompt_response": bm25_scores((q["prompt"] + " " + q["response"]).to_list(),
                                           (train["prompt"] + " " + train["response"]).to_list()),
        }
        if sim.train_ids != train["id"].to_list():
            raise ValueError(f"{sim_path}: training ids differ from {job.input['train']}")
        candidates = None
        if p["candidates"] and sim.candidates is None:  # the published protocol: BM25 over training prompts
            b = min(p["candidates"], len(sim.train_ids))
            candidates = top_candidates(baselines["prompt"], sim.targets(np.arange(len(sim.query_ids))), b)
        for split in range(p["n_splits"]):
            _, held = split_queries(sim.query_ids, p["selection_fraction"], p["split_seed"] + split)
            r, pq = evaluate_split(sim, setting, split, held, selection.filter(pl.col("split") == split),
                                   projections, baselines, scoring, candidates)
            rows += r
            per_query += pq
    everything = tidy(rows, p["recall_at"], costs)
    table = everything.filter(pl.col("protocol") == "corpus")
    write_parquet(table, job.output["metrics"])
    write_parquet(everything.filter(pl.col("protocol") == "candidates"), job.output["candidates"])
    write_parquet(pl.DataFrame(per_query, schema=PER_QUERY_SCHEMA), job.output["per_query"])
    for r in (table.filter(pl.col("method").is_in(["full", "greedy", "best_single"]))
              .group_by("setting", "method", maintain_order=True).agg(pl.col("top1", "mrr").mean())
              .iter_rows(named=True)):
        log.info("%s %-11s top1 %.3f mrr %.3f (mean over splits)", r["setting"], r["method"], r["top1"], r["mrr"])
    mlrun.log_metrics({"n_rows": table.height})
