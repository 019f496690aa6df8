"""Stage `projection`: random projections of every sample's full gradient to k dims, for each seed."""

from __future__ import annotations

import logging
import time

import h5py
import numpy as np

from tdabench.io import atomic_path
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.projection import ProjectionConfig, project_store
from tdabench.store import STR, GradientStore

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    p, k = job.params, int(job.wildcards["k"])
    with GradientStore(job.input["train"]) as train, GradientStore(job.input["query_grads"]) as queries:
        dim = sum(train.dim(c) for c in train.components)
        if k > dim:
            raise ValueError(f"config key projection.dims: k={k} exceeds the full gradient dimension {dim}")
        with atomic_path(job.output["projection"]) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update({"kind": p["kind"], "k": k, "nonzeros": p["nonzeros"], "full_dim": dim,
                            "model_fingerprint": train.attrs.get("model_fingerprint", "")})
            f.create_dataset("train_ids", data=np.array(train.sample_ids, dtype=object), dtype=STR)
            f.create_dataset("query_ids", data=np.array(queries.sample_ids, dtype=object), dtype=STR)
            for seed in p["seeds"]:
                cfg = ProjectionConfig(p["kind"], k, seed, p["nonzeros"])
                start = time.perf_counter()
                grp = f.create_group(f"seed_{seed}")
                grp["train"] = project_store(train, cfg)
                grp["queries"] = project_store(queries, cfg)
                seconds = time.perf_counter() - start
                grp.attrs["seconds_per_sample"] = seconds / (len(train) + len(queries))
                log.info("k=%d seed=%d: %.2f s for %d samples", k, seed, seconds, len(train) + len(queries))
                mlrun.log_metrics({"seconds": seconds}, step=seed)
