"""Stage `similarity`: per-component dot products and norms for one query setting, from the
gradient cache (`main`), or streamed straight from the model (`main_stream`: one job per training
shard writes every setting's part in one pass, then `main_merge` per setting).
`similarity.source` in the config picks which (tdabench.streaming)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import polars as pl

from tdabench.cached import CacheProducer
from tdabench.candidates import candidate_rows, read_candidates
from tdabench.contracts import MergeParams, SimilarityParams, StreamParams
from tdabench.data.sources import read_setting_queries, read_train
from tdabench.models import model_fingerprint
from tdabench.pipeline.attribution import AttributionKit, open_extraction
from tdabench.pipeline.common import JobContext
from tdabench.producer import Target, ground_truth
from tdabench.progress import Progress
from tdabench.similarity import merge_similarity
from tdabench.store import GradientStore
from tdabench.streaming import StreamProducer, StreamReport, StreamSpec
from tdabench.tracking import file_manifest

log = logging.getLogger(__name__)


def store_candidates(job: JobContext, setting: str, query_ids: list[str], train_ids: list[str]):
    """The candidate layout's training rows per query -> [Q, b], from the one candidate table."""
    (path,) = job.input["bm25_candidates"]  # a one-file list (empty in the dense layout)
    return candidate_rows(read_candidates(path), setting, query_ids, train_ids, str(path))


def main(job: JobContext, mlrun) -> None:
    p, setting = job.typed_params(SimilarityParams), job.wildcards["setting"]
    everything, rows = read_setting_queries(job.input["queries"], setting)
    queries = everything[rows]
    start = time.perf_counter()
    with GradientStore(job.input["train"]) as train, GradientStore(job.input["query_grads"]) as qstore:
        candidates = None
        if p.layout == "candidates":
            candidates = store_candidates(job, setting, queries["id"].to_list(), train.sample_ids)
        producer = CacheProducer(train, qstore, p.block_rows)
        ids, sources = queries["id"].to_list(), queries["source_id"].to_list()
        target = producer.target(ids, sources, {"setting": setting}, candidates, p.dtype)
        with Progress(total=len(train.components), desc=f"similarity {setting}", unit="components") as bar:
            producer.write(job.output["similarity"], target, bar)
        n_train, n_comp = len(train), len(train.components)
    seconds = time.perf_counter() - start
    log.info("%d queries x %d train x %d components in %.1f s", queries.height, n_train, n_comp, seconds)
    mlrun.log_metrics({"n_queries": queries.height, "n_train": n_train, "n_components": n_comp, "seconds": seconds})
    mlrun.log_dict(file_manifest([job.output["similarity"]]), "manifest.json")


def main_stream(job: JobContext, mlrun) -> None:
    """One training shard of every setting's similarity store, streamed from the model in one pass:
    each training gradient is computed once and dotted with the queries of all settings."""
    p = job.typed_params(StreamParams)
    stream = open_stream(job, mlrun, p, int(job.wildcards["part"]))
    write_stream(job, mlrun, p, stream)


@dataclass
class StreamJob:
    """What a streamed similarity job works on: the model's extraction, the query table and the
    training examples (tables, encoded), each setting's target, the stores' paths."""

    kit: AttributionKit
    shard: int
    train: pl.DataFrame
    queries: pl.DataFrame  # the whole query table
    encoded_train: list
    encoded_queries: list
    targets: list[Target]
    outs: list[str]
    check_metrics: dict


def open_stream(job: JobContext, mlrun, p: StreamParams, shard: int) -> StreamJob:
    """The model's extraction, checked on the first training batch, and every setting's target."""
    train = read_train(job.input["train"])
    train_ids = train["id"].to_list()
    targets = []
    for setting in p.settings:
        everything, rows = read_setting_queries(job.input["queries"], setting)  # the whole table, its rows
        queries = everything[rows]
        candidates = None
        if p.layout == "candidates":
            candidates = store_candidates(job, setting, queries["id"].to_list(), train_ids)
        attrs = {
            "setting": setting,
            "model_fingerprint": model_fingerprint(p.model),
            "shard": shard,
            "n_shards": p.shards,
            "config_hash": job.settings_digest(),  # every setting that shapes the numbers: resume and merge check it
            "numerics": job.numerics,
        }
        gt = ground_truth(train_ids, queries["source_id"].to_list())
        targets.append(Target(queries["id"].to_list(), train_ids, gt, candidates, attrs, p.dtype))

    kit = open_extraction(job, mlrun, p.model, p.device, p.extraction)
    encoded_queries = kit.encode(everything, p.tokenize, "query")
    encoded_train = kit.encode(train, p.tokenize, "training")
    first = next(iter(kit.extraction.batches(encoded_train, kit.pad_id)), (None, None))[1]
    check = kit.self_check(first, p.verify, p.verify_tolerance, keep_grads=False)
    outs = [job.output["parts"][i] for i in range(len(p.settings))]
    metrics = check.metrics if check else {}
    return StreamJob(kit, shard, train, everything, encoded_train, encoded_queries, targets, outs, metrics)


def write_stream(job: JobContext, mlrun, p: StreamParams, s: StreamJob, tap=None) -> StreamReport:
    """Every setting's store of the job's shard in one pass (handing `tap` the pass' formed
    components where it can: tdabench.streaming.Streamer.run), logged."""
    spec = StreamSpec(p.layout, p.memory_gb, s.shard, p.shards)
    ids = s.queries["id"].to_list()
    producer = StreamProducer(s.kit.extraction, s.kit.pad_id, spec, s.encoded_queries, s.encoded_train, ids)
    with Progress(desc=f"similarity shard {s.shard} ({', '.join(p.settings)})", unit="steps") as bar:
        report = producer.write_all(s.outs, s.targets, bar, tap)
    n_queries = sum(len(t.query_ids) for t in s.targets)
    log.info(
        "%s layout, %d setting(s) in one pass: %d units (%d resumed), %d samples through the model, %.1f s; "
        "mean %.0f tokens, %.1f pairs per sample%s",
        p.layout,
        len(p.settings),
        report.n_units,
        report.units_resumed,
        report.samples_computed,
        report.seconds,
        report.tokens,
        report.pairs_per_sample,
        f", {report.chunk_queries} queries per chunk" if report.chunk_queries else "",
    )
    if report.train_group_rows:
        log.info("training examples formed and multiplied %d at a time", report.train_group_rows)
    if report.spill_gb:
        log.info("training examples read back from disk after the first pass: %.1f GB written", report.spill_gb)
    counts = Counter(report.ways.values())
    mlrun.log_metrics(
        {
            "n_queries": n_queries,
            "n_settings": len(p.settings),
            "n_train": s.train.height,
            "n_components": len(report.ways),
            "n_factored": counts.get("factored", 0),
            "n_materialised": counts.get("materialised", 0),
            "n_units": report.n_units,
            "units_resumed": report.units_resumed,
            "samples_computed": report.samples_computed,
            "seconds": report.seconds,
            "seconds_per_query": report.seconds / max(n_queries, 1),
            "pairs_per_sample": report.pairs_per_sample,
            **({"train_group_rows": report.train_group_rows} if report.train_group_rows else {}),
            "spill_gb": report.spill_gb,
            **s.check_metrics,
        }
    )
    mlrun.log_dict(report.ways, "component_ways.json")
    mlrun.log_dict(file_manifest(s.outs), "manifest.json")
    return report


def main_merge(job: JobContext, mlrun) -> None:
    """Sum the shards of a streamed store (exact: each number comes from one shard)."""
    p = job.typed_params(MergeParams)
    sim = merge_similarity(list(job.input["parts"]), job.output["similarity"], p.dtype)
    log.info("merged %d shard(s): %s", len(job.input["parts"]), sim.provenance())
    mlrun.log_metrics({"n_parts": len(job.input["parts"]), "n_components": len(sim.components)})
    mlrun.log_dict(file_manifest([job.output["similarity"]]), "manifest.json")
