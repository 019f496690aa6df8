"""Stage `costs`: the time to represent new samples with each method, all measured in one run on
the same queries (logic: tdabench.costs)."""

from __future__ import annotations

import logging

import polars as pl

from tdabench.contracts import CostsParams
from tdabench.costs import TimedExtraction, costs_table, measure_setting, write_costs
from tdabench.data.sources import read_queries
from tdabench.extraction import Extraction
from tdabench.models import encode_all, load_model
from tdabench.pipeline.common import JobContext, job_device, set_threads
from tdabench.selection import SelectionTable

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    p = job.typed_params(CostsParams)
    device = job_device(p.device, mlrun)
    model, tokenizer = load_model(p.model)
    model.to(device)
    extraction = Extraction(model, p.extraction)
    queries = read_queries(job.input["queries"])
    rows = []
    for setting, sel_path in zip(p.settings, job.input["selection"]):
        sample = queries.filter(pl.col("setting") == setting).sort("id").head(p.cost_samples)
        examples = encode_all(tokenizer, sample["prompt"], sample["response"], p.tokenize)
        timed = TimedExtraction(extraction, examples, tokenizer.pad_token_id)
        rows += measure_setting(setting, timed, SelectionTable.read(sel_path), p.costs, sample.height)
    table = costs_table(rows)
    write_costs(table, job.output["costs"])
    for r in table.iter_rows(named=True):
        name = "_".join(str(x) for x in (r["setting"], r["method"], r["variant"], r["k"]) if x is not None)
        mlrun.log_metrics({f"ms_per_sample.{name}".replace(" ", "_"): r["seconds_per_sample"] * 1e3})
    mlrun.log_table(table, "costs.json")
