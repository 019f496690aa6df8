"""Stage `gradients`: per-sample gradients of one shard of one split into an HDF5 store."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict

import tdabench
from tdabench.codedeps import sources_digest
from tdabench.contracts import GradientsParams
from tdabench.data.sources import read_queries, read_train
from tdabench.extraction import Extraction
from tdabench.models import encode_all, load_model, model_fingerprint, unlabelled
from tdabench.pipeline.common import JobContext, job_device, set_threads
from tdabench.progress import Progress
from tdabench.store import GradientStoreWriter, estimate_bytes
from tdabench.tracking import file_manifest

log = logging.getLogger(__name__)


def shard_rows(n: int, shard: int, n_shards: int) -> slice:
    """Contiguous rows of shard `shard` (0-based) out of `n_shards` near-equal shards."""
    return slice(shard * n // n_shards, (shard + 1) * n // n_shards)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    p = job.typed_params(GradientsParams)
    split, shard = job.wildcards["split"], int(job.wildcards["shard"])
    tables = {"train": read_train(job.input["train"]), "queries": read_queries(job.input["queries"])}
    df = tables[split][shard_rows(tables[split].height, shard, p.shards)]
    device = job_device(p.device, mlrun)
    model, tokenizer = load_model(p.model)
    model.to(device)
    extraction = Extraction(model, p.extraction)
    stored = extraction.stored_dims
    total = estimate_bytes(sum(t.height for t in tables.values()), stored, p.dtype)
    if total > p.max_cache_gb * 1e9:
        raise ValueError(
            f"config key gradients.max_cache_gb: the gradient cache would take about {total / 1e9:.1f} GB "
            f"(> {p.max_cache_gb} GB); set gradients.max_component_dim, select fewer "
            "gradients.components, use gradients.dtype float16 or raise the limit"
        )
    estimate = estimate_bytes(df.height, stored, p.dtype)

    if df.height == 0:
        raise ValueError(
            f"{split} shard {shard}: no examples ({tables[split].height} in the split, {p.shards} shards); "
            "config key gradients.shards must not exceed the number of training examples"
        )
    examples = encode_all(tokenizer, df["prompt"], df["response"], p.tokenize)
    empty = unlabelled(examples)
    if empty:
        ids = [df["id"][i] for i in empty]
        raise ValueError(
            f"{len(empty)} {split} example(s) have no labelled token left after truncation to "
            f"tokenize.max_length={p.tokenize.max_length} tokens, so their gradient would be zero: ids {ids[:10]}; "
            "raise config key tokenize.max_length (or shorten their prompts)"
        )
    n_trunc = sum(e.truncated for e in examples)
    if n_trunc:
        log.warning("%d of %d examples truncated to %d tokens", n_trunc, len(examples), p.tokenize.max_length)
    attrs = {
        "split": split,
        "shard": shard,
        "n_shards": p.shards,
        "model_fingerprint": model_fingerprint(p.model),
        "config_hash": hashlib.sha256(json.dumps(job.params, sort_keys=True).encode()).hexdigest()[:12],
        "code_version": f"{tdabench.__version__}+{sources_digest('tdabench.pipeline.gradients')}",
        "n_truncated": n_trunc,
    }
    log.info(
        "%d samples x %d components (%d sketched), %d stored dims, about %.1f MB -> %s",
        len(examples),
        len(extraction.names),
        len(extraction.sketches),
        sum(stored),
        estimate / 1e6,
        job.output["store"],
    )
    batches = list(extraction.batches(examples, tokenizer.pad_token_id))

    start, computed = time.perf_counter(), 0
    first = None  # the first batch's gradients, computed by the self-check, written below
    check_metrics = {}
    if p.verify and batches:
        # Raises (before any store file exists) with a table of the failing components.
        grads, report = extraction.check(batches[0][1], p.verify, p.verify_tolerance)
        first = {n: g.numpy() for n, g in grads.items()}
        attrs |= {
            "verify_samples": len(report.samples),
            "verify_tolerance": report.tolerance,
            "verify_max_error": report.worst,
        }
        check_metrics = {"verify_max_error": report.worst, "verify_seconds": report.seconds}
        log.info(
            "self-check: %d samples of the first batch vs a bs=1 loss.backward() loop: worst relative "
            "error %.2e (tolerance %.0e), %.2f s",
            len(report.samples),
            report.worst,
            report.tolerance,
            report.seconds,
        )
    extractor = extraction.extractor()
    log.info("%s", extractor.describe_paths())
    buffers = extraction.buffers(p.extraction.batch_size)  # every batch is written into these, then stored
    with GradientStoreWriter(
        job.output["store"], df["id"].to_list(), extraction.components, p.dtype, attrs, extraction.sketch_info
    ) as store:
        progress = Progress(batches, len(batches), f"gradients {split} shard {shard}", unit="batches")
        for i, (rows, batch) in enumerate(progress):
            if store.done[rows].all():  # resumed from an interrupted run
                continue
            if i == 0 and first is not None:
                grads = first
            else:
                out = {n: b[: rows.stop - rows.start] for n, b in buffers.items()}
                grads = {n: g.numpy() for n, g in extraction(batch, out=out).items()}
            store.write(rows, grads)
            computed += rows.stop - rows.start
    seconds = time.perf_counter() - start
    if extractor.paths != extractor.plan:  # a later batch sent a component to the loop
        log.info("%s", extractor.describe_paths())
    manifest = file_manifest([job.output["store"]])
    mlrun.log_metrics(
        {
            "n_samples": len(examples),
            "n_computed": computed,
            "n_components": len(extraction.names),
            "n_sketched": len(extraction.sketches),
            "stored_dim": sum(stored),
            "seconds": seconds,
            "samples_per_second": computed / max(seconds, 1e-9),
            "store_bytes": manifest[0]["bytes"],
            "estimated_bytes": estimate,
            "n_truncated": n_trunc,
            **check_metrics,
            **{f"n_path_{k}": v for k, v in extractor.path_counts().items()},
            "batch_rows": extraction.max_rows or p.extraction.batch_size,
        }
    )
    mlrun.log_dict({n: asdict(path) for n, path in extractor.paths.items()}, "gradient_paths.json")
    mlrun.log_dict(manifest, "manifest.json")
    log.info(
        "%.1f samples/s, %.1f MB (estimate %.1f MB)",
        computed / max(seconds, 1e-9),
        manifest[0]["bytes"] / 1e6,
        estimate / 1e6,
    )
