"""What every model stage does before its own work, in one call: threads and numerics checks, the
model on the job's device, and examples encoded with their checks (stages that compute gradients
add the extraction: tdabench.pipeline.attribution).

    kit = open_model(job, mlrun, p.model, p.device)
    examples = kit.encode(table, p.tokenize, "training")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import polars as pl
import torch

from tdabench import tracking
from tdabench.models import Encoded, encode_all, load_model, unlabelled
from tdabench.pipeline.common import JobContext, job_device, set_threads
from tdabench.sections import TokenizeConfig

log = logging.getLogger("tdabench")


@dataclass
class ModelKit:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

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


def open_model(job: JobContext, mlrun: tracking.Run, ref: str, device: str) -> ModelKit:
    """The job's threads and numerics checks, and the model `ref` (a directory or hub name) on
    the device of config value `device`."""
    set_threads(job.threads)
    mlrun.sample_system()  # CPU, memory (and GPU memory) while the model works: MLflow's system metrics
    where = job_device(device, mlrun)
    model, tokenizer = load_model(ref)
    mlrun.use_model(ref)
    model.to(where)
    return ModelKit(model, tokenizer, where)
