"""Stages `background` and `dataset`: the benchmark tables.

`background` holds what the tiny base model is pre-trained on; it depends on the background
settings only, so changing the planted settings reruns `dataset` but never pre-training.
"""

from __future__ import annotations

import logging

import polars as pl

from tdabench import tracking
from tdabench.contracts import BackgroundParams, DatasetParams
from tdabench.data.sources import (
    load_files,
    load_files_train,
    load_huggingface,
    load_huggingface_train,
    read_train,
    write_queries,
    write_train,
)
from tdabench.data.synthetic import SyntheticConfig, generate, generate_background
from tdabench.pipeline.common import JobContext

log = logging.getLogger(__name__)


def _user_train(p: DatasetParams) -> pl.DataFrame:
    if p.kind == "files":
        return load_files_train(p.files["train"])
    return load_huggingface_train(p.huggingface["train"])


def main_background(job: JobContext, mlrun) -> None:
    p = job.typed_params(BackgroundParams)
    if p.kind == "synthetic":
        table = generate_background(SyntheticConfig(**p.synthetic, seed=p.seed))
    else:  # user data: rows marked background, or every training row
        train = _user_train(p)
        table = train.filter(pl.col("role") == "background") if (train["role"] == "background").any() else train
    write_train(table, job.output["background"])
    log.info("background: %d examples", table.height)
    mlrun.log_metrics({"n_background": table.height})


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(DatasetParams)
    if p.kind == "synthetic":
        (background_path,) = job.input["background"]  # a one-file list: the input is empty for user data
        background = read_train(background_path)
        train, queries = generate(SyntheticConfig(**p.synthetic, seed=p.seed), background)
    elif p.kind == "files":
        train, queries = load_files(p.files["train"], p.files["queries"])
    else:
        train, queries = load_huggingface(p.huggingface["train"], p.huggingface["queries"])
    write_train(train, job.output["train"])
    write_queries(queries, job.output["queries"])
    counts = {
        "n_train": train.height,
        **{f"n_role.{r}": n for r, n in train["role"].value_counts().iter_rows()},
        **{f"n_queries.{s}": n for s, n in queries["setting"].value_counts().iter_rows()},
    }
    log.info("benchmark: %s", counts)
    mlrun.log_metrics(counts)
    parent = tracking.parent()
    for run in (mlrun, parent):
        run.log_input(train, "train", job.output["train"], "training")
        run.log_input(queries, "queries", job.output["queries"], "evaluation")
