"""Stage `summary`: summary.md and plots; headline metrics, table and plots into the parent run."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import polars as pl

from tdabench import tracking
from tdabench.evaluate import headline, summary_markdown
from tdabench.io import write_text
from tdabench.pipeline.common import JobContext
from tdabench.plots import plot_metric_vs_cost, plot_metric_vs_dim

log = logging.getLogger(__name__)


def headline_metrics(table: pl.DataFrame) -> dict[str, float]:
    """Flat MLflow metric names: `paraphrased.greedy.top1`, `paraphrased.projection_gaussian_k256.mrr`, ..."""
    out = {}
    for r in headline(table).iter_rows(named=True):
        name = r["method"]
        if r["variant"] and r["method"] in ("projection", "bm25", "greedy_budget"):
            name += f"_{r['variant']}"
        if r["k"] is not None:
            name += f"_k{r['k']}"
        name = re.sub(r"[^\w.\-/]", "_", f"{r['setting']}.{name}")
        for m in ("top1", "mrr", *[c for c in r if c.startswith("recall_at_")]):
            out[f"{name}.{m}"] = r[m]
        out[f"{name}.dim"] = r["dim"]
        if r["seconds_per_sample"] is not None:
            out[f"{name}.ms_per_sample"] = r["seconds_per_sample"] * 1e3
    return out


def main(job: JobContext, mlrun) -> None:
    order = {s: i for i, s in enumerate(job.params["settings"])}
    table = pl.read_parquet(job.input["metrics"]).sort(pl.col("setting").replace_strict(order), maintain_order=True)
    plots = [job.output["plot_top1"], job.output["plot_mrr"], job.output["plot_cost"]]
    plot_metric_vs_dim(table, plots[0], "top1")
    plot_metric_vs_dim(table, plots[1], "mrr")
    plot_metric_vs_cost(table, plots[2], "top1")
    here = Path(job.output["summary"]).parent
    write_text(summary_markdown(table, [os.path.relpath(p, here) for p in plots]), job.output["summary"])
    metrics = headline_metrics(table)
    parent = tracking.parent()
    for run in (mlrun, parent):
        run.log_metrics(metrics)
        for path in (job.output["summary"], *plots, job.input["metrics"]):
            run.log_artifact(path, "results")
    log.info("%d headline metrics logged%s", len(metrics), " to the parent run" if parent.active else "")
