"""Stage `costs`: the time to represent new samples with each method, all measured in one run on
the same queries (logic: tdabench.costs)."""

from __future__ import annotations

import logging

import polars as pl

from tdabench.contracts import CostsParams
from tdabench.costs import ReduceTimes, TimedExtraction, measure_setting
from tdabench.costs_table import costs_table, write_costs
from tdabench.data.sources import read_queries
from tdabench.pipeline.attribution import open_extraction
from tdabench.pipeline.common import JobContext
from tdabench.selection import SelectionTable

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(CostsParams)
    kit = open_extraction(job, mlrun, p.model, p.device, p.extraction)
    queries = read_queries(job.input["queries"])
    rows, reduce = [], ReduceTimes()  # projections timed once for both settings
    for setting, sel_path in zip(p.settings, job.input["selection"]):
        sample = queries.filter(pl.col("setting") == setting).sort("id").head(p.cost_samples)
        examples = kit.encode(sample, p.tokenize, f"{setting} query", require_labels=False)
        timed = TimedExtraction(kit.extraction, examples, kit.pad_id)
        rows += measure_setting(setting, timed, SelectionTable.read(sel_path), p.costs, sample.height, reduce)
    table = costs_table(rows)
    write_costs(table, job.output["costs"])
    for r in table.iter_rows(named=True):
        name = "_".join(str(x) for x in (r["setting"], r["method"], r["variant"], r["k"]) if x is not None)
        mlrun.log_metrics({f"ms_per_sample.{name}".replace(" ", "_"): r["seconds_per_sample"] * 1e3})
    mlrun.log_table(table, "costs.json")
