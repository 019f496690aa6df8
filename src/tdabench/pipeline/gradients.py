"""Stage `gradients`: per-sample gradients of one shard of one split into an HDF5 store."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import polars as pl
from tqdm.auto import tqdm

import tdabench
from tdabench.components import component_registry, match_components
from tdabench.gradients import iter_batches, per_sample_gradients
from tdabench.models import collate, encode, load_model, model_fingerprint
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.store import GradientStoreWriter
from tdabench.tracking import file_manifest

log = logging.getLogger(__name__)


def shard_rows(n: int, shard: int, n_shards: int) -> slice:
    """Contiguous rows of shard `shard` (0-based) out of `n_shards` near-equal shards."""
    return slice(shard * n // n_shards, (shard + 1) * n // n_shards)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    p = job.params
    shard, n_shards = int(job.wildcards["shard"]), p["shards"]
    data = pl.read_parquet(job.input["data"])
    df = data[shard_rows(data.height, shard, n_shards)]
    model, tokenizer = load_model(job.input["model"])
    registry = {c.name: c for c in component_registry(model)}
    names = match_components(list(registry), p["components"])
    components = [registry[n] for n in names]
    tok = p["tokenize"]
    examples = [encode(tokenizer, a, b, tok["max_length"], tok["loss_on"])
                for a, b in zip(df["prompt"], df["response"])]
    n_trunc = sum(e.truncated for e in examples)
    if n_trunc:
        log.warning("%d of %d examples truncated to %d tokens", n_trunc, len(examples), tok["max_length"])
    attrs = {
        "split": job.wildcards["split"], "shard": shard, "n_shards": n_shards,
        "model_fingerprint": model_fingerprint(job.input["model"]),
        "config_hash": hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12],
        "code_version": tdabench.__version__, "n_truncated": n_trunc,
    }
    dim = sum(c.numel for c in components)
    log.info("%d samples x %d components (dim %d) -> %s", len(examples), len(components), dim, job.output["store"])

    start = time.perf_counter()
    with GradientStoreWriter(job.output["store"], df["id"].to_list(), components, p["dtype"], attrs) as store:
        for rows in tqdm(list(iter_batches(len(examples), p["batch_size"])), desc="gradients", mininterval=2.0):
            batch = collate(examples[rows], tokenizer.pad_token_id)
            grads = per_sample_gradients(model, batch["input_ids"], batch["attention_mask"], batch["labels"], names)
            store.write(rows, {n: g.numpy() for n, g in grads.items()})
    seconds = time.perf_counter() - start
    manifest = file_manifest([job.output["store"]])
    mlrun.log_metrics({"n_samples": len(examples), "n_components": len(components), "gradient_dim": dim,
                       "seconds": seconds, "samples_per_second": len(examples) / max(seconds, 1e-9),
                       "store_bytes": manifest[0]["bytes"], "n_truncated": n_trunc})
    mlrun.log_dict(manifest, "manifest.json")
    log.info("%.1f samples/s, %.1f MB", len(examples) / max(seconds, 1e-9), manifest[0]["bytes"] / 1e6)
