"""Stage `gradients`: per-sample gradients of one shard of one split into an HDF5 store
(logic: tdabench.gradient_cache)."""

from __future__ import annotations

import logging
from dataclasses import asdict

import tdabench
from tdabench.codedeps import sources_digest
from tdabench.contracts import GradientsParams
from tdabench.data.sources import read_queries, read_train
from tdabench.gradient_cache import cache_gradients, check_cache_budget
from tdabench.models import model_fingerprint
from tdabench.pipeline.attribution import open_extraction
from tdabench.pipeline.common import JobContext
from tdabench.plan import shard_rows
from tdabench.store import estimate_bytes
from tdabench.tracking import file_manifest

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(GradientsParams)
    split, shard = job.wildcards["split"], int(job.wildcards["shard"])
    tables = {"train": read_train(job.input["train"]), "queries": read_queries(job.input["queries"])}
    df = tables[split][shard_rows(tables[split].height, shard, p.shards)]
    kit = open_extraction(job, mlrun, p.model, p.device, p.extraction)
    extraction, stored = kit.extraction, kit.extraction.stored_dims
    check_cache_budget(sum(t.height for t in tables.values()), stored, p.dtype, p.max_cache_gb)
    if df.height == 0:
        raise ValueError(
            f"{split} shard {shard}: no examples ({tables[split].height} in the split, {p.shards} shards); "
            "config key gradients.shards must not exceed the number of training examples"
        )
    examples = kit.encode(df, p.tokenize, split)
    estimate = estimate_bytes(df.height, stored, p.dtype)
    log.info(
        "%d samples x %d components (%d sketched), %d stored dims, about %.1f MB -> %s",
        len(examples),
        len(extraction.names),
        len(extraction.sketches),
        sum(stored),
        estimate / 1e6,
        job.output["store"],
    )
    batches = kit.batches(examples)
    check = kit.self_check(batches[0][1] if batches else None, p.verify, p.verify_tolerance)
    attrs = {
        "split": split,
        "shard": shard,
        "n_shards": p.shards,
        "model_fingerprint": model_fingerprint(p.model),
        "config_hash": job.settings_digest(),  # the resume key: params and numerics
        "code_version": f"{tdabench.__version__}+{sources_digest('tdabench.pipeline.gradients')}",
        "n_truncated": sum(e.truncated for e in examples),
        **(check.attrs if check else {}),
    }
    extractor = extraction.extractor()
    log.info("%s", extractor.describe_paths())
    first = {n: g.numpy() for n, g in check.grads.items()} if check else None
    ids, desc = df["id"].to_list(), f"gradients {split} shard {shard}"
    report = cache_gradients(extraction, batches, job.output["store"], ids, p.dtype, attrs, first, desc)
    if extractor.paths != extractor.plan:  # a later batch sent a component to the loop
        log.info("%s", extractor.describe_paths())
    manifest = file_manifest([job.output["store"]])
    rate = report.computed / max(report.seconds, 1e-9)
    mlrun.log_metrics(
        {
            "n_samples": len(examples),
            "n_computed": report.computed,
            "n_components": len(extraction.names),
            "n_sketched": len(extraction.sketches),
            "stored_dim": sum(stored),
            "seconds": report.seconds,
            "samples_per_second": rate,
            "store_bytes": manifest[0]["bytes"],
            "estimated_bytes": estimate,
            "n_truncated": attrs["n_truncated"],
            **(check.metrics if check else {}),
            **{f"n_path_{k}": v for k, v in extractor.path_counts().items()},
            "batch_rows": extraction.max_rows or p.extraction.batch_size,
        }
    )
    mlrun.log_dict({n: asdict(path) for n, path in extractor.paths.items()}, "gradient_paths.json")
    mlrun.log_dict(manifest, "manifest.json")
    log.info("%.1f samples/s, %.1f MB (estimate %.1f MB)", rate, manifest[0]["bytes"] / 1e6, estimate / 1e6)
