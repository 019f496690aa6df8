"""Stages `projection_stream` (every projection method of the full gradient, in one pass) and
`project_selected_stream` (select-then-project of every setting, in one pass), straight from the model: the
`similarity.source: stream` counterparts of `projection` and `project_selected`, with the same
files and, for the same gradients, the same numbers (tdabench.projection_stream)."""

from __future__ import annotations

import logging

from tdabench.contracts import SelectedStreamParams, StreamProjectionParams
from tdabench.data.sources import read_queries, read_train
from tdabench.models import model_fingerprint
from tdabench.pipeline.attribution import AttributionKit, open_extraction
from tdabench.pipeline.common import JobContext
from tdabench.progress import Progress
from tdabench.projection import ProjectionConfig, method_config
from tdabench.projection_files import ProjectionWriter
from tdabench.projection_stream import Plan, project_from_model
from tdabench.selection import SelectionTable

log = logging.getLogger(__name__)


def _open(job: JobContext, mlrun, p) -> tuple[AttributionKit, list, list, list[str], list[str]]:
    """The model's extraction, checked on its first batch; the encoded training examples and
    queries, and their ids (the gradients stage's order and batches)."""
    train, queries = read_train(job.input["train"]), read_queries(job.input["queries"])
    kit = open_extraction(job, mlrun, p.model, p.device, p.extraction)
    parts = [kit.encode(train, p.tokenize, "training"), kit.encode(queries, p.tokenize, "query")]
    first = next(iter(kit.extraction.batches(parts[0], kit.pad_id)), (None, None))[1]
    check = kit.self_check(first, p.verify, p.verify_tolerance)
    if check:
        mlrun.log_metrics(check.metrics)
    return kit, parts, train["id"].to_list(), queries["id"].to_list()


def _run(kit: AttributionKit, parts, plans: list[Plan], memory_gb: float, desc: str):
    # each sample twice: through the model, then projected with its group
    with Progress(total=2 * sum(len(p) for p in parts), desc=desc, unit="sample steps") as bar:
        outs, report = project_from_model(kit.extraction, kit.pad_id, parts, plans, memory_gb, bar)
    log.info(
        "%d projection(s) of %d samples in %.1f s (gradients %.1f s), %d group(s) of up to %d samples, "
        "%d component(s) held as factors",
        len(plans),
        sum(len(p) for p in parts),
        report.seconds,
        report.extract_seconds,
        report.groups,
        report.group_rows,
        len(report.factored),
    )
    return outs, report


def main_stream(job: JobContext, mlrun) -> None:
    """Every configured full-gradient method at every k and seed, from one pass over the samples."""
    p = job.typed_params(StreamProjectionParams)
    methods = [m for m in p.methods if m != "select_then_project"]
    kit, parts, train_ids, query_ids = _open(job, mlrun, p)
    extraction = kit.extraction
    full_dim = sum(extraction.stored_dims)
    too_big = [k for k in p.dims if k > full_dim]
    if too_big:
        raise ValueError(f"config key projection.dims: {too_big} exceed the full gradient dimension {full_dim}")
    keys = [(m, k, seed) for m in methods for k in p.dims for seed in p.seeds]
    plans = [Plan(method_config(m, k, seed, p.nonzeros), tuple(extraction.names)) for m, k, seed in keys]
    outs, report = _run(kit, parts, plans, p.memory_gb, f"projections ({', '.join(methods)})")
    n_train, n = len(train_ids), len(train_ids) + len(query_ids)
    fingerprint = model_fingerprint(p.model)
    for i, method in enumerate(methods):
        path = job.output["projection"][i]
        with ProjectionWriter(
            path, method, train_ids, query_ids, full_dim=full_dim, model_fingerprint=fingerprint
        ) as writer:
            for (m, k, seed), out, seconds in zip(keys, outs, report.plan_seconds):
                if m == method:
                    writer.add(k, seed, out[:n_train], out[n_train:], seconds / n)
    mlrun.log_metrics(
        {
            "n_samples": n,
            "seconds": report.seconds,
            "extract_seconds": report.extract_seconds,
            "groups": report.groups,
            "group_rows": report.group_rows,
            **{f"seconds.{m}_k{k}_seed{s}": t for (m, k, s), t in zip(keys, report.plan_seconds)},
        }
    )


def main_selected_stream(job: JobContext, mlrun) -> None:
    """select-then-project of every setting: each split's greedy set, at every k and seed, from one
    pass that computes only the selected components' gradients (those of any setting's sets)."""
    p = job.typed_params(SelectedStreamParams)
    kit, parts, train_ids, query_ids = _open(job, mlrun, p)
    dims = dict(zip(kit.extraction.names, kit.extraction.stored_dims))
    keys, plans = [], []  # keys: (setting, split, k, seed, components)
    for setting, path in zip(p.settings, job.input["selection"]):
        selection = SelectionTable.read(path)
        for split in selection.splits:
            names = selection.greedy_set(split)
            dim = sum(dims[c] for c in names)
            for k in p.dims:
                if k >= dim:  # projecting up (or to the same size) adds nothing over the selection itself
                    log.info("%s split %d: k=%d >= selected dim %d, skipped", setting, split, k, dim)
                    continue
                for seed in p.seeds:
                    keys.append((setting, split, k, seed, names))
                    plans.append(Plan(ProjectionConfig(p.select_kind, k, seed, p.nonzeros), tuple(names)))
    outs, seconds = [], []  # (no plan: every file is written empty)
    n_train, n = len(train_ids), len(train_ids) + len(query_ids)
    if plans:
        outs, report = _run(kit, parts, plans, p.memory_gb, f"select-then-project ({', '.join(p.settings)})")
        seconds = report.plan_seconds
        mlrun.log_metrics({"seconds": report.seconds, "extract_seconds": report.extract_seconds})
    for setting, path in zip(p.settings, job.output["projection"]):
        with ProjectionWriter(path, "select_then_project", train_ids, query_ids, kind=p.select_kind) as writer:
            for (s, split, k, seed, names), out, t in zip(keys, outs, seconds):
                if s == setting:
                    writer.add(k, seed, out[:n_train], out[n_train:], t / n, split=split, components=names)
    mlrun.log_metrics({"n_projections": len(plans)})
