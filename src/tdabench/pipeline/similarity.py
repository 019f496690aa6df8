"""Stage `similarity`: per-component dot products and norms for one query setting."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import polars as pl

from tdabench.data.sources import read_queries
from tdabench.pipeline.common import JobContext
from tdabench.progress import Progress
from tdabench.similarity import build_similarity
from tdabench.store import GradientStore
from tdabench.tracking import file_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    block_rows: int  # similarity.block_rows
    dtype: str  # similarity.dtype


def main(job: JobContext, mlrun) -> None:
    p, setting = job.typed_params(Params), job.wildcards["setting"]
    everything = read_queries(job.input["queries"])
    queries = everything.filter(pl.col("setting") == setting)
    if queries.height == 0:
        raise ValueError(
            f"no queries of setting {setting!r} in {job.input['queries']} (it has "
            f"{sorted(set(everything['setting']))}); fix config key dataset.settings or the query data"
        )
    start = time.perf_counter()
    with GradientStore(job.input["train"]) as train, GradientStore(job.input["query_grads"]) as qstore:
        with Progress(total=len(train.components), desc=f"similarity {setting}", unit="components") as bar:
            build_similarity(
                train,
                qstore,
                queries["id"].to_list(),
                queries["source_id"].to_list(),
                job.output["similarity"],
                setting,
                p.block_rows,
                p.dtype,
                progress=bar,
            )
        n_train, n_comp = len(train), len(train.components)
    seconds = time.perf_counter() - start
    log.info("%d queries x %d train x %d components in %.1f s", queries.height, n_train, n_comp, seconds)
    mlrun.log_metrics({"n_queries": queries.height, "n_train": n_train, "n_components": n_comp, "seconds": seconds})
    mlrun.log_dict(file_manifest([job.output["similarity"]]), "manifest.json")
