"""Stage `generate`: model-generated queries: the fine-tuned model's greedy answer to each
paraphrased prompt becomes the query response (setting `model_generated`)."""

from __future__ import annotations

import logging

import polars as pl

from tdabench.contracts import GenerateParams
from tdabench.data.sources import read_queries, write_queries
from tdabench.pipeline.common import JobContext
from tdabench.pipeline.toolkit import open_model
from tdabench.train import greedy_answers, states_fact

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(GenerateParams)
    queries = read_queries(job.input["queries"])
    if (queries["setting"] == "model_generated").any():  # the data brings its own (e.g. the published LIMA set)
        log.info("the query data already holds model_generated queries: none generated")
        write_queries(queries, job.output["queries"])
        mlrun.log_metrics({"n_generated": 0})
        return
    para = queries.filter(pl.col("setting") == "paraphrased")
    if para.is_empty():
        raise ValueError(
            f"setting model_generated needs paraphrased queries to answer; {job.input['queries']} has none"
        )
    kit = open_model(job, mlrun, p.model, p.device)
    answers = greedy_answers(
        kit.model, kit.tokenizer, para["prompt"].to_list(), p.max_length, p.max_new_tokens, p.batch_size, progress=True
    )
    generated = para.with_columns(
        pl.Series("response", [a.strip() for a in answers]),
        pl.lit("model_generated").alias("setting"),
        ("g" + pl.col("id")).alias("id"),
    )
    if "value" in para.columns:  # does the model's own answer state the planted fact?
        generated = generated.with_columns(
            pl.Series("states_fact", [states_fact(a, v) for a, v in zip(answers, para["value"].to_list())])
        )
        rate = float(generated["states_fact"].mean())
        log.info("model-generated answers state the planted fact in %.1f%% of queries", 100 * rate)
        mlrun.log_metrics({"states_fact_rate": rate})
    empty = int((generated["response"].str.len_chars() == 0).sum())
    if empty:
        log.warning("%d generated answers are empty", empty)
    write_queries(pl.concat([queries, generated], how="diagonal_relaxed"), job.output["queries"])
    mlrun.log_metrics({"n_generated": generated.height, "n_empty": empty})
