"""Stages `projection` (one method of the full gradient, every k and seed) and `project_selected`
(select-then-project: each split's greedy set, every k and seed)."""

from __future__ import annotations

import logging
import time

from tdabench.contracts import ProjectionParams, SelectedProjectionParams
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.projection import ProjectionConfig, method_config, project_store
from tdabench.projection_files import ProjectionWriter
from tdabench.selection import SelectionTable
from tdabench.store import GradientStore

log = logging.getLogger(__name__)


def _project(train: GradientStore, queries: GradientStore, cfg: ProjectionConfig, components=None):
    """(train [T, k], queries [Q, k], seconds per sample)."""
    start = time.perf_counter()
    t = project_store(train, cfg, components=components)
    q = project_store(queries, cfg, components=components)
    return t, q, (time.perf_counter() - start) / (len(train) + len(queries))


def main(job: JobContext, mlrun) -> None:
    """One full-gradient projection method at every k and seed."""
    set_threads(job.threads)
    p, method = job.typed_params(ProjectionParams), job.wildcards["method"]
    with GradientStore(job.input["train"]) as train, GradientStore(job.input["query_grads"]) as queries:
        full_dim = sum(train.dim(c) for c in train.components)
        too_big = [k for k in p.dims if k > full_dim]
        if too_big:
            raise ValueError(f"config key projection.dims: {too_big} exceed the full gradient dimension {full_dim}")
        fingerprint = train.attrs.get("model_fingerprint", "")
        with ProjectionWriter(
            job.output["projection"],
            method,
            train.sample_ids,
            queries.sample_ids,
            full_dim=full_dim,
            model_fingerprint=fingerprint,
        ) as out:
            for k in p.dims:
                for seed in p.seeds:
                    t, q, per_sample = _project(train, queries, method_config(method, k, seed, p.nonzeros))
                    out.add(k, seed, t, q, per_sample)
                    seconds = per_sample * (len(train) + len(queries))
                    log.info("%s k=%d seed=%d: %.2f s", method, k, seed, seconds)
                    mlrun.log_metrics({f"seconds_k{k}": seconds}, step=seed)


def main_selected(job: JobContext, mlrun) -> None:
    """select-then-project: each split's chosen greedy set, projected with `select_kind`."""
    set_threads(job.threads)
    p = job.typed_params(SelectedProjectionParams)
    selection = SelectionTable.read(job.input["selection"])
    with GradientStore(job.input["train"]) as train, GradientStore(job.input["query_grads"]) as queries:
        with ProjectionWriter(
            job.output["projection"], "select_then_project", train.sample_ids, queries.sample_ids, kind=p.select_kind
        ) as out:
            for split in selection.splits:
                names = selection.greedy_set(split)
                dim = sum(train.dim(c) for c in names)
                for k in p.dims:
                    if k >= dim:  # projecting up (or to the same size) adds nothing over the selection itself
                        log.info("split %d: k=%d >= selected dim %d, skipped", split, k, dim)
                        continue
                    for seed in p.seeds:
                        cfg = ProjectionConfig(p.select_kind, k, seed, p.nonzeros)
                        t, q, per_sample = _project(train, queries, cfg, components=names)
                        out.add(k, seed, t, q, per_sample, split=split, components=names)
