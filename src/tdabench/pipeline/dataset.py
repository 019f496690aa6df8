"""Stage `dataset`: build the benchmark tables."""

from __future__ import annotations

import logging

import polars as pl

from tdabench import tracking
from tdabench.data.synthetic import SyntheticConfig, generate
from tdabench.io import write_parquet
from tdabench.pipeline.common import JobContext

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p = job.params
    if p["kind"] != "synthetic":
        raise ValueError(f"config key dataset.kind: unsupported value {p['kind']!r} (allowed: synthetic)")
    train, queries = generate(SyntheticConfig(**p["synthetic"], seed=p["seed"]))
    queries = queries.filter(pl.col("setting").is_in(p["settings"]))
    write_parquet(train, job.output["train"])
    write_parquet(queries, job.output["queries"])
    counts = {
        "n_train": train.height,
        "n_planted": train.filter(pl.col("role") == "planted").height,
        "n_background": train.filter(pl.col("role") == "background").height,
        "n_entities": train["entity"].n_unique(),
        **{f"n_queries.{s}": queries.filter(pl.col("setting") == s).height for s in p["settings"]},
    }
    log.info("benchmark: %s", counts)
    mlrun.log_metrics(counts)
    parent = tracking.parent()
    for run in (mlrun, parent):
        run.log_input(train, "train", job.output["train"], "training")
        run.log_input(queries, "queries", job.output["queries"], "evaluation")
    for path in (job.output["train"], job.output["queries"]):
        mlrun.log_artifact(path, "data")
