"""Stage `gradients`: per-sample gradients of one shard of one split into an HDF5 store."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import polars as pl
import torch
from tqdm.auto import tqdm

import tdabench
from tdabench.codedeps import sources_digest
from tdabench.components import component_registry, match_components
from tdabench.gradcheck import check_extractor
from tdabench.gradients import GradientExtractor, iter_batches
from tdabench.models import collate, encode, load_model, model_fingerprint
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.projection import CountSketch, name_key
from tdabench.store import GradientStoreWriter, estimate_bytes
from tdabench.tracking import file_manifest

log = logging.getLogger(__name__)


def shard_rows(n: int, shard: int, n_shards: int) -> slice:
    """Contiguous rows of shard `shard` (0-based) out of `n_shards` near-equal shards."""
    return slice(shard * n // n_shards, (shard + 1) * n // n_shards)


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    p = job.params
    split, shard, n_shards = job.wildcards["split"], int(job.wildcards["shard"]), p["shards"]
    tables = {s: pl.read_parquet(job.input[s]) for s in ("train", "queries")}
    df = tables[split][shard_rows(tables[split].height, shard, n_shards)]
    model, tokenizer = load_model(p["model"])
    registry = {c.name: c for c in component_registry(model)}
    names = match_components(list(registry), p["components"])
    components = [registry[n] for n in names]

    cap = p["max_component_dim"]
    sketch_info = {c.name: {"kind": "countsketch", "k": cap, "seed": p["sketch_seed"], "key": name_key(c.name)}
                   for c in components if cap is not None and c.numel > cap}
    sketches = {n: CountSketch(registry[n].numel, s["k"], s["seed"], s["key"]) for n, s in sketch_info.items()}
    stored = [sketch_info[c.name]["k"] if c.name in sketch_info else c.numel for c in components]
    total = estimate_bytes(sum(t.height for t in tables.values()), stored, p["dtype"])
    if total > p["max_cache_gb"] * 1e9:
        raise ValueError(
            f"config key gradients.max_cache_gb: the gradient cache would take about {total / 1e9:.1f} GB "
            f"(> {p['max_cache_gb']} GB); set gradients.max_component_dim, select fewer "
            "gradients.components, use gradients.dtype float16 or raise the limit"
        )
    estimate = estimate_bytes(df.height, stored, p["dtype"])

    tok = p["tokenize"]
    examples = [encode(tokenizer, a, b, tok["max_length"], tok["loss_on"])
                for a, b in zip(df["prompt"], df["response"])]
    n_trunc = sum(e.truncated for e in examples)
    if n_trunc:
        log.warning("%d of %d examples truncated to %d tokens", n_trunc, len(examples), tok["max_length"])
    attrs = {
        "split": split, "shard": shard, "n_shards": n_shards,
        "model_fingerprint": model_fingerprint(p["model"]),
        "config_hash": hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12],
        "code_version": f"{tdabench.__version__}+{sources_digest('tdabench.pipeline.gradients')}",
        "n_truncated": n_trunc,
    }
    log.info("%d samples x %d components (%d sketched), %d stored dims, about %.1f MB -> %s",
             len(examples), len(components), len(sketches), sum(stored), estimate / 1e6, job.output["store"])
    autocast = getattr(torch, p["autocast"]) if p["autocast"] else None
    extract = GradientExtractor(model, names, sketches=sketches, autocast_dtype=autocast)
    batches = list(iter_batches(len(examples), p["batch_size"]))

    start, computed = time.perf_counter(), 0
    first = None  # the first batch's gradients, computed by the self-check, written below
    check_metrics = {}
    if p["verify"] and batches:
        batch = collate(examples[batches[0]], tokenizer.pad_token_id)
        # Raises (before any store file exists) with a table of the failing components.
        grads, report = check_extractor(extract, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        samples=p["verify"], tolerance=p["verify_tolerance"])
        first = {n: g.numpy() for n, g in grads.items()}
        attrs |= {"verify_samples": len(report.samples), "verify_tolerance": report.tolerance,
                  "verify_max_error": report.worst}
        check_metrics = {"verify_max_error": report.worst, "verify_seconds": report.seconds}
        log.info("self-check: %d samples of the first batch vs a bs=1 loss.backward() loop: worst relative "
                 "error %.2e (tolerance %.0e), %.2f s", len(report.samples), report.worst, report.tolerance,
                 report.seconds)
    log.info("%s", extract.describe_paths())
    with GradientStoreWriter(job.output["store"], df["id"].to_list(), components, p["dtype"], attrs,
                             sketch_info) as store:
        for i, rows in enumerate(tqdm(batches, desc="gradients", mininterval=2.0)):
            if store.done[rows].all():  # resumed from an interrupted run
                continue
            if i == 0 and first is not None:
                grads = first
            else:
                batch = collate(examples[rows], tokenizer.pad_token_id)
                grads = {n: g.numpy() for n, g in extract(batch["input_ids"], batch["attention_mask"],
                                                          batch["labels"]).items()}
            store.write(rows, grads)
            computed += rows.stop - rows.start
    seconds = time.perf_counter() - start
    if extract.paths != extract.plan:  # a later batch sent a component to the loop
        log.info("%s", extract.describe_paths())
    manifest = file_manifest([job.output["store"]])
    mlrun.log_metrics({"n_samples": len(examples), "n_computed": computed, "n_components": len(components),
                       "n_sketched": len(sketches), "stored_dim": sum(stored), "seconds": seconds,
                       "samples_per_second": computed / max(seconds, 1e-9), "store_bytes": manifest[0]["bytes"],
                       "estimated_bytes": estimate, "n_truncated": n_trunc, **check_metrics,
                       **{f"n_path_{k}": v for k, v in extract.path_counts().items()}})
    mlrun.log_dict({n: vars(p) for n, p in extract.paths.items()}, "gradient_paths.json")
    mlrun.log_dict(manifest, "manifest.json")
    log.info("%.1f samples/s, %.1f MB (estimate %.1f MB)", computed / max(seconds, 1e-9),
             manifest[0]["bytes"] / 1e6, estimate / 1e6)
