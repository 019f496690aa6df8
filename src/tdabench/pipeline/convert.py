"""Stage `convert`: a GGUF model, dequantised once and saved as a normal checkpoint (cached)."""

from __future__ import annotations

import logging

from tdabench.contracts import ConvertParams
from tdabench.io import atomic_path
from tdabench.models import load_model
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.resources import gguf_location

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    g = job.typed_params(ConvertParams).gguf
    folder, file = gguf_location(g["path"], g["package"], g["file"])
    model, tokenizer = load_model(folder, gguf_file=file)
    with atomic_path(job.output["model"], directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n = sum(t.numel() for t in model.parameters())
    log.info("%s/%s: %s, %d parameters", folder, file, type(model).__name__, n)
    mlrun.log_metrics({"n_parameters": n})
