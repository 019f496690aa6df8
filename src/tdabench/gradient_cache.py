"""The gradient cache's producer: one split's per-sample gradients into a gradient store, batch by
batch, resumable (the streamed counterpart, which writes no gradients, is tdabench.streaming).

A killed job leaves a partial store whose `done` rows are skipped on the next run, so a resumed
store is byte-identical to an uninterrupted one (tdabench.store.GradientStoreWriter).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tdabench.errors import StudyError
from tdabench.extraction import Extraction
from tdabench.progress import Progress
from tdabench.store import GradientStoreWriter, estimate_bytes


class CacheTooLargeError(StudyError, ValueError):
    """The gradient cache would exceed gradients.max_cache_gb."""


def check_cache_budget(n_samples: int, stored_dims: Sequence[int], dtype: str, max_cache_gb: float) -> int:
    """The cache's size in bytes; CacheTooLargeError (naming the keys to change) above the budget."""
    total = estimate_bytes(n_samples, stored_dims, dtype)
    if total > max_cache_gb * 1e9:
        raise CacheTooLargeError(
            f"config key gradients.max_cache_gb: the gradient cache would take about {total / 1e9:.1f} GB "
            f"(> {max_cache_gb} GB); set gradients.max_component_dim, select fewer "
            "gradients.components, use gradients.dtype float16 or raise the limit"
        )
    return total


@dataclass
class CacheReport:
    computed: int  # samples computed by this run (the others were resumed)
    seconds: float


def cache_gradients(
    extraction: Extraction,
    batches: Sequence[tuple[slice, dict[str, torch.Tensor]]],
    path: str | Path,
    sample_ids: Sequence[str],
    dtype: str,
    attrs: dict,
    first: Mapping[str, np.ndarray] | None = None,
    desc: str = "gradients",
) -> CacheReport:
    """Every batch's gradients into the store at `path` (resuming a partial one). `first`: the
    first batch's gradients when already computed (by the self-check), written as they are."""
    start, computed = time.perf_counter(), 0
    buffers = extraction.buffers(extraction.cfg.batch_size)  # every batch is written into these, then stored
    with GradientStoreWriter(path, sample_ids, extraction.components, dtype, attrs, extraction.sketch_info) as store:
        for i, (rows, batch) in enumerate(Progress(batches, len(batches), desc, unit="batches")):
            if store.done[rows].all():  # resumed from an interrupted run
                continue
            if i == 0 and first is not None:
                grads = first
            else:
                out = {n: b[: rows.stop - rows.start] for n, b in buffers.items()}
                grads = {n: g.numpy() for n, g in extraction(batch, out=out).items()}
            store.write(rows, grads)
            computed += rows.stop - rows.start
    return CacheReport(computed, time.perf_counter() - start)
