"""Stage `pretrain`: the tiny default base model, trained on the background data only."""

from __future__ import annotations

import logging

import polars as pl

from tdabench.data.synthetic import vocabulary_corpus
from tdabench.io import atomic_path, write_json
from tdabench.models import TinyModelConfig, build_tiny_model, encode, train_tokenizer
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.train import TrainConfig, train

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    p, tok = job.params, job.params["tokenize"]
    background = pl.read_parquet(job.input["background"])
    texts = background["prompt"].to_list() + background["response"].to_list()
    # The tokenizer's "general corpus": for the synthetic benchmark every template's words and every
    # answer value, so held-out query words are whole tokens (the model never trains on them).
    general = vocabulary_corpus() if p["kind"] == "synthetic" else []
    tokenizer = train_tokenizer(texts + general, p["model"]["vocab_size"])
    model = build_tiny_model(TinyModelConfig(**p["model"]), tokenizer, seed=p["seed"],
                             max_positions=2 * tok["max_length"])
    examples = [encode(tokenizer, a, b, tok["max_length"], tok["loss_on"])
                for a, b in zip(background["prompt"], background["response"])]
    curve = []
    if p["train"]["epochs"]:
        curve = train(model, examples, tokenizer.pad_token_id, TrainConfig(**p["train"], seed=p["seed"]), desc="pretrain")
    for point in curve:
        mlrun.log_metrics({"pretrain_loss": point["loss"]}, step=point["epoch"])
    log.info("base model: %d parameters, %d background examples, final loss %s",
             sum(t.numel() for t in model.parameters()), len(examples), curve[-1]["loss"] if curve else "-")
    with atomic_path(job.output["model"], directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_json({"loss_curve": curve, "n_background": len(examples)}, job.output["report"])
