"""Stage `pretrain`: the tiny default base model, trained on the background data only."""

from __future__ import annotations

import logging
from dataclasses import asdict

from tdabench.contracts import PretrainParams
from tdabench.data.sources import read_train
from tdabench.data.synthetic import vocabulary_corpus
from tdabench.io import atomic_path, write_json
from tdabench.models import build_tiny_model, encode_all, train_tokenizer
from tdabench.pipeline.common import JobContext, job_device, set_threads
from tdabench.train import train

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    mlrun.sample_system()
    p = job.typed_params(PretrainParams)
    device = job_device(p.device, mlrun)
    background = read_train(job.input["background"])
    texts = background["prompt"].to_list() + background["response"].to_list()
    # The tokenizer's "general corpus": for the synthetic benchmark every template's words and every
    # answer value, so held-out query words are whole tokens (the model never trains on them).
    general = vocabulary_corpus() if p.kind == "synthetic" else []
    tokenizer = train_tokenizer(texts + general, p.model.vocab_size)
    model = build_tiny_model(p.model, tokenizer, seed=p.seed, max_positions=2 * p.tokenize.max_length)
    model.to(device)
    examples = encode_all(tokenizer, background["prompt"], background["response"], p.tokenize)
    curve = []
    if p.train.epochs:
        curve = train(model, examples, tokenizer.pad_token_id, p.train, desc="pretrain")
    for point in curve:
        mlrun.log_metrics({"pretrain_loss": point["loss"]}, step=point["epoch"])
    log.info(
        "base model: %d parameters, %d background examples, final loss %s",
        sum(t.numel() for t in model.parameters()),
        len(examples),
        curve[-1]["loss"] if curve else "-",
    )
    with atomic_path(job.output["model"], directory=True) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_json({"loss_curve": curve, "n_background": len(examples), "train": asdict(p.train)}, job.output["report"])
