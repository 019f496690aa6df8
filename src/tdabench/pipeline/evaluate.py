"""Stage `evaluate`: the tidy results table over all settings and methods."""

from __future__ import annotations

import logging

import h5py
import polars as pl

from tdabench.evaluate import Projected, evaluate_setting
from tdabench.io import write_parquet
from tdabench.pipeline.common import JobContext
from tdabench.selection import split_queries
from tdabench.similarity import load_similarity

log = logging.getLogger(__name__)


def load_projections(paths: list[str], seeds: list[int], query_ids: list[str]) -> list[Projected]:
    out = []
    for path in paths:
        with h5py.File(path, "r") as f:
            row_of = {s.decode(): i for i, s in enumerate(f["query_ids"][:])}
            rows = [row_of[q] for q in query_ids]
            for seed in seeds:
                g = f[f"seed_{seed}"]
                out.append(Projected(str(f.attrs["kind"]), int(f.attrs["k"]), seed, g["train"][:],
                                     g["queries"][:][rows], float(g.attrs["seconds_per_sample"])))
    return out


def main(job: JobContext, mlrun) -> None:
    p = job.params
    tables = []
    for setting, sim_path, sel_path in zip(p["settings"], job.input["similarity"], job.input["selection"]):
        sim = load_similarity(sim_path)
        _, held = split_queries(sim.query_ids, p["selection_fraction"], p["split_seed"])
        projections = load_projections(job.input["projection"], p["seeds"], sim.query_ids)
        table = evaluate_setting(sim, setting, pl.read_parquet(sel_path), projections, held, p["recall_at"])
        tables.append(table)
        for r in table.filter(pl.col("method").is_in(["full", "greedy", "best_single"])).iter_rows(named=True):
            log.info("%s %-11s dim %8d top1 %.3f mrr %.3f", setting, r["method"], r["dim"], r["top1"], r["mrr"])
    table = pl.concat(tables)
    write_parquet(table, job.output["metrics"])
    mlrun.log_metrics({"n_rows": table.height})
