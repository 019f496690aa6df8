"""Stages `projection` (one method of the full gradient, every k and seed) and `project_selected`
(select-then-project: each split's greedy set, every k and seed)."""

from __future__ import annotations

import json
import logging
import time

import h5py
import numpy as np
import polars as pl

from tdabench.io import atomic_path
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.projection import ProjectionConfig, method_config, project_store
from tdabench.store import STR, GradientStore

log = logging.getLogger(__name__)


def _ids(f: h5py.File, train: GradientStore, queries: GradientStore) -> None:
    f.create_dataset("train_ids", data=np.array(train.sample_ids, dtype=object), dtype=STR)
    f.create_dataset("query_ids", data=np.array(queries.sample_ids, dtype=object), dtype=STR)


def _project(group: h5py.Group, train, queries, cfg: ProjectionConfig, components=None) -> float:
    start = time.perf_counter()
    group["train"] = project_store(train, cfg, components=components)
    group["queries"] = project_store(queries, cfg, components=components)
    seconds = time.perf_counter() - start
    group.attrs["seconds_per_sample"] = seconds / (len(train) + len(queries))
    return seconds


def main(job: JobContext, mlrun) -> None:
    """One full-gradient projection method at every k and seed."""
    set_threads(job.threads)
    p, method = job.params, job.wildcards["method"]
    with GradientStore(job.input["train"]) as train, GradientStore(job.input["query_grads"]) as queries:
        full_dim = sum(train.dim(c) for c in train.components)
        too_big = [k for k in p["dims"] if k > full_dim]
        if too_big:
            raise ValueError(f"config key projection.dims: {too_big} exceed the full gradient dimension {full_dim}")
        with atomic_path(job.output["projection"]) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update({"method": method, "full_dim": full_dim,
                            "model_fingerprint": train.attrs.get("model_fingerprint", "")})
            _ids(f, train, queries)
            for k in p["dims"]:
                for seed in p["seeds"]:
                    cfg = method_config(method, k, seed, p["nonzeros"])
                    seconds = _project(f.create_group(f"k{k}/seed{seed}"), train, queries, cfg)
                    log.info("%s k=%d seed=%d: %.2f s", method, k, seed, seconds)
                    mlrun.log_metrics({f"seconds_k{k}": seconds}, step=seed)


def main_selected(job: JobContext, mlrun) -> None:
    """select-then-project: each split's chosen greedy set, projected with `select_kind`."""
    set_threads(job.threads)
    p = job.params
    selection = pl.read_parquet(job.input["selection"])
    greedy = selection.filter(pl.col("kind") == "greedy").sort("split", "step")
    with GradientStore(job.input["train"]) as train, GradientStore(job.input["query_grads"]) as queries:
        with atomic_path(job.output["projection"]) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update({"method": "select_then_project", "kind": p["select_kind"]})
            _ids(f, train, queries)
            for split in sorted(set(greedy["split"].to_list())):
                rows = greedy.filter(pl.col("split") == split)
                n = rows.filter(pl.col("chosen"))["step"][0]
                names = rows["component"][:n].to_list()
                dim = sum(train.dim(c) for c in names)
                grp = f.create_group(f"split{split}")
                grp.attrs["components"] = json.dumps(names)
                grp.attrs["selected_dim"] = dim
                for k in p["dims"]:
                    if k >= dim:  # projecting up (or to the same size) adds nothing over the selection itself
                        log.info("split %d: k=%d >= selected dim %d, skipped", split, k, dim)
                        continue
                    for seed in p["seeds"]:
                        cfg = ProjectionConfig(p["select_kind"], k, seed, p["nonzeros"])
                        _project(grp.create_group(f"k{k}/seed{seed}"), train, queries, cfg, components=names)
