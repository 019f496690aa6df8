"""Stage `finetune`: train the base model on the training set until the planted facts are learned."""

from __future__ import annotations

import logging

import polars as pl

from tdabench.contracts import FinetuneParams
from tdabench.data.sources import read_queries, read_train
from tdabench.io import atomic_path, write_json
from tdabench.models import model_fingerprint
from tdabench.pipeline.common import JobContext
from tdabench.pipeline.toolkit import open_model
from tdabench.train import greedy_answers, states_fact, train

log = logging.getLogger(__name__)


def fact_report(
    model, tokenizer, train_df: pl.DataFrame, queries: pl.DataFrame, max_length: int, batch_size: int
) -> dict:
    """How many planted facts the model states when asked the training question and the paraphrase
    (needs the `value` column of the synthetic benchmark)."""
    if "value" not in train_df.columns or not (train_df["role"] == "planted").any():
        return {}
    planted = train_df.filter(pl.col("role") == "planted")
    para = queries.filter(pl.col("setting") == "paraphrased").join(
        planted.select(pl.col("id").alias("source_id"), pl.col("value").alias("fact")), on="source_id"
    )
    report = {}
    for name, prompts, values in (
        ("planted_recall_train_prompt", planted["prompt"], planted["value"]),
        ("planted_recall_paraphrased_prompt", para["prompt"], para["fact"]),
    ):
        answers = greedy_answers(model, tokenizer, prompts.to_list(), max_length, batch_size=batch_size)
        hits = [states_fact(a, v) for a, v in zip(answers, values.to_list())]
        report[name] = sum(hits) / max(1, len(hits))
        report[name.replace("recall", "correct")] = sum(hits)
        report[f"{name}_examples"] = [
            {"prompt": q, "answer": a, "value": v} for q, a, v in list(zip(prompts, answers, values))[:5]
        ]
        log.info("%s: %d / %d", name, sum(hits), len(hits))
    return report


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(FinetuneParams)
    kit = open_model(job, mlrun, p.base, p.device)
    model, tokenizer = kit.model, kit.tokenizer
    train_df = read_train(job.input["train"])
    queries = read_queries(job.input["queries"])
    examples = kit.encode(train_df, p.tokenize, "training")  # an example without a labelled token: refused here
    n_trunc = sum(e.truncated for e in examples)
    n_params = sum(t.numel() for t in model.parameters())
    log.info("fine-tuning %s (%d parameters) on %d examples", p.base, n_params, len(examples))
    curve = train(model, examples, tokenizer.pad_token_id, p.train, desc="finetune")
    for point in curve:
        mlrun.log_metrics({"train_loss": point["loss"]}, step=point["epoch"])
    report = {
        "loss_curve": curve,
        "n_truncated": n_trunc,
        "n_train": len(examples),
        **fact_report(model, tokenizer, train_df, queries, p.tokenize.max_length, p.eval_batch_size),
    }
    mlrun.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
    mlrun.log_metrics({"final_train_loss": curve[-1]["loss"]})
    with atomic_path(job.output["model"], directory=True) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_json(report, job.output["report"])
    mlrun.log_artifact(job.output["report"])
    size = {"base": p.base, "parameters": n_params, "epochs": p.train.epochs}
    mlrun.log_model("finetuned", job.output["model"], model_fingerprint(job.output["model"]), size)
