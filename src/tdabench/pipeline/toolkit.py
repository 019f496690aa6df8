"""What every model stage does before its own work, in one call: threads and numerics checks, the
model on the job's device, its `Extraction`, and examples encoded with their checks.

    kit = open_model(job, mlrun, p.model, p.device, p.extraction)
    examples = kit.encode(table, p.tokenize, "training")
    check = kit.self_check(examples, p.verify, p.verify_tolerance)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import polars as pl
import torch

from tdabench import tracking
from tdabench.extraction import Extraction
from tdabench.models import Encoded, encode_all, load_model, unlabelled
from tdabench.pipeline.common import JobContext, job_device, set_threads
from tdabench.sections import ExtractionConfig, TokenizeConfig

log = logging.getLogger("tdabench")


@dataclass
class SelfCheck:
    """The extractor against a bs=1 loss.backward() loop on the first batch (tdabench.gradcheck)."""

    grads: dict[str, torch.Tensor]  # the first batch's gradients, already computed: reuse them
    metrics: dict[str, float] = field(default_factory=dict)  # for the job's MLflow run
    attrs: dict[str, float] = field(default_factory=dict)  # for the stored file's attributes


@dataclass
class ModelKit:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    extraction: Extraction | None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encode(
        self, table: pl.DataFrame, tokenize: TokenizeConfig, what: str, require_labels: bool = True
    ) -> list[Encoded]:
        """The table's (prompt, response) pairs as token ids with loss labels; truncations are
        logged, and (require_labels) an example left without a labelled token is an error that
        names its ids: its loss and gradient would be zero, so no query could retrieve it."""
        examples = encode_all(self.tokenizer, table["prompt"], table["response"], tokenize)
        empty = unlabelled(examples) if require_labels else []
        if empty:
            raise ValueError(
                f"{len(empty)} {what} example(s) have no labelled token left after truncation to "
                f"tokenize.max_length={tokenize.max_length} tokens, so their gradient would be zero: "
                f"ids {[table['id'][i] for i in empty][:10]}; raise config key tokenize.max_length "
                "(or shorten their prompts)"
            )
        n_trunc = sum(e.truncated for e in examples)
        if n_trunc:
            limit = tokenize.max_length
            log.warning("%d of %d %s examples truncated to %d tokens", n_trunc, len(examples), what, limit)
        return examples

    def batches(self, examples: list[Encoded]) -> list[tuple[slice, dict[str, torch.Tensor]]]:
        return list(self.extraction.batches(examples, self.pad_id))

    def self_check(self, first_batch: dict[str, torch.Tensor] | None, samples: int, tolerance: float | None):
        """Check the extractor on `samples` rows of the first batch before anything is written
        (raises with a table of the failing components); None when switched off (samples 0)."""
        if not samples or first_batch is None:
            return None
        grads, report = self.extraction.check(first_batch, samples, tolerance)
        log.info(
            "self-check: %d samples of the first batch vs a bs=1 loss.backward() loop: worst relative "
            "error %.2e (tolerance %.0e), %.2f s",
            len(report.samples),
            report.worst,
            report.tolerance,
            report.seconds,
        )
        metrics = {"verify_max_error": report.worst, "verify_seconds": report.seconds}
        attrs = {"verify_samples": len(report.samples), "verify_tolerance": report.tolerance}
        return SelfCheck(grads, metrics, {**attrs, "verify_max_error": report.worst})


def open_model(
    job: JobContext, mlrun: tracking.Run, ref: str, device: str, extraction: ExtractionConfig | None = None
) -> ModelKit:
    """The job's threads and numerics checks, the model `ref` (a directory or hub name) on the
    device of config value `device`, and (given its config) its Extraction."""
    set_threads(job.threads)
    where = job_device(device, mlrun)
    model, tokenizer = load_model(ref)
    model.to(where)
    return ModelKit(model, tokenizer, where, Extraction(model, extraction) if extraction else None)
