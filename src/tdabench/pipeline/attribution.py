"""The toolkit of the stages that compute gradients (gradients, streamed similarity, costs): a model
stage's kit plus its `Extraction`, batches, and the self-check against the bs=1 loop.

    kit = open_extraction(job, mlrun, p.model, p.device, p.extraction)
    batches = kit.batches(kit.encode(table, p.tokenize, "training"))
    check = kit.self_check(batches[0][1], p.verify, p.verify_tolerance)

Kept apart from tdabench.pipeline.toolkit so that stages that only train or generate do not
depend on the gradient code (their rules' `code` inputs stay exact).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tdabench import tracking
from tdabench.device import release_free_memory
from tdabench.extraction import Extraction
from tdabench.models import Encoded
from tdabench.pipeline.common import JobContext
from tdabench.pipeline.toolkit import ModelKit, open_model
from tdabench.sections import ExtractionConfig

log = logging.getLogger("tdabench")


@dataclass
class SelfCheck:
    """The extractor against a bs=1 loss.backward() loop on the first batch (tdabench.gradcheck)."""

    grads: dict[str, torch.Tensor]  # the first batch's gradients, already computed: reuse them
    metrics: dict[str, float] = field(default_factory=dict)  # for the job's MLflow run
    attrs: dict[str, float] = field(default_factory=dict)  # for the stored file's attributes


@dataclass
class AttributionKit(ModelKit):
    extraction: Extraction

    def batches(self, examples: list[Encoded]) -> list[tuple[slice, dict[str, torch.Tensor]]]:
        return list(self.extraction.batches(examples, self.pad_id))

    def self_check(
        self,
        first_batch: dict[str, torch.Tensor] | None,
        samples: int,
        tolerance: float | None,
        keep_grads: bool = True,
    ):
        """Check the extractor on `samples` rows of the first batch before anything is written
        (raises with a table of the failing components); None when switched off (samples 0).
        keep_grads=False: the batch's formed gradients (3.4 GB at SmolLM2's size) are dropped and
        their memory handed back to the system, for a job that will not write them."""
        if not samples or first_batch is None:
            return None
        grads, report = self.extraction.check(first_batch, samples, tolerance)
        if not keep_grads:
            grads = {}
            release_free_memory()
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


def open_extraction(
    job: JobContext, mlrun: tracking.Run, ref: str, device: str, extraction: ExtractionConfig
) -> AttributionKit:
    """`open_model`, then the model's Extraction as configured."""
    kit = open_model(job, mlrun, ref, device)
    return AttributionKit(kit.model, kit.tokenizer, kit.device, Extraction(kit.model, extraction))
