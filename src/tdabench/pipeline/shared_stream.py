"""Stage `similarity_projection_stream`: every setting's similarity store and every projection
from one pass over the model (similarity.source stream, dense layout, one shard,
similarity.share_pass). The pass forms each component for all training examples and queries at
once to take its dot products; the projections are taken from those same formed gradients
(tdabench.projection_stream.InPass), so they need no pass of their own. Where the pass cannot
hand them every sample (several query chunks, no room on disk, a resumed store), the job
projects in a pass of its own, as `projection_stream` would: the same files either way."""

from __future__ import annotations

import logging

from tdabench.contracts import SharedStreamParams
from tdabench.pipeline.common import JobContext
from tdabench.pipeline.projection_stream import (
    projection_plans,
    projection_seconds,
    run_projections,
    write_projections,
)
from tdabench.pipeline.similarity import open_stream, write_stream
from tdabench.projection_stream import InPass, Projections

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(SharedStreamParams)
    stream = open_stream(job, mlrun, p, shard=0)
    extraction = stream.kit.extraction
    train_ids, query_ids = stream.train["id"].to_list(), stream.queries["id"].to_list()
    dims = dict(zip(extraction.names, extraction.stored_dims))
    with projection_plans(job, p, extraction, train_ids, query_ids) as (plans, keys, on_part):
        projections = Projections(plans, extraction.names, dims, len(train_ids) + len(query_ids), on_part)
        tap = InPass(projections, extraction, len(train_ids), len(query_ids))
        report = write_stream(job, mlrun, p, stream, tap)
        if tap.complete:
            outs, seconds = projections.outs, projections.seconds
            log.info("%d projection(s) of %d samples taken from the similarity pass", len(plans), projections.n)
        else:
            log.info(
                "the similarity pass did not form every sample at once (%d unit(s), %d resumed, %.1f GB on disk): "
                "projections in a pass of their own",
                report.n_units,
                report.units_resumed,
                report.spill_gb,
            )
            parts = [stream.encoded_train, stream.encoded_queries]
            desc = f"projections ({', '.join(p.methods)})"
            outs, own = run_projections(stream.kit, parts, plans, p.memory_gb, desc, on_part)
            seconds = own.plan_seconds
    write_projections(job, p, sum(extraction.stored_dims), keys, outs, seconds, train_ids, query_ids)
    mlrun.log_metrics({"projections_in_pass": float(tap.complete), **projection_seconds(keys, seconds)})
