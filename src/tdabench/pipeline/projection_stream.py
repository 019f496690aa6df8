"""Stages `projection_stream` (every projection method of the full gradient, in one pass) and
`project_selected_stream` (select-then-project of every setting, in one pass), straight from the model: the
`similarity.source: stream` counterparts of `projection` and `project_selected`, with the same
files and, for the same gradients, the same numbers (tdabench.projection_stream)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from tdabench.contracts import SelectedStreamParams, StreamProjectionParams
from tdabench.data.sources import read_queries, read_train
from tdabench.models import model_fingerprint
from tdabench.pipeline.attribution import AttributionKit, open_extraction
from tdabench.pipeline.common import JobContext
from tdabench.progress import Progress
from tdabench.projection import ProjectionConfig, method_config
from tdabench.projection_files import ProjectionWriter
from tdabench.projection_parts import Parts, PartsWriter, positions, select_sum
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
    check = kit.self_check(first, p.verify, p.verify_tolerance, keep_grads=False)
    if check:
        mlrun.log_metrics(check.metrics)
    return kit, parts, train["id"].to_list(), queries["id"].to_list()


def run_projections(kit: AttributionKit, parts, plans: list[Plan], memory_gb: float, desc: str, on_part=None):
    # each sample twice: through the model, then projected with its group
    with Progress(total=2 * sum(len(p) for p in parts), desc=desc, unit="sample steps") as bar:
        outs, report = project_from_model(kit.extraction, kit.pad_id, parts, plans, memory_gb, bar, on_part)
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
    kit, parts, train_ids, query_ids = _open(job, mlrun, p)
    with projection_plans(job, p, kit.extraction, train_ids, query_ids) as (plans, keys, on_part):
        outs, report = run_projections(kit, parts, plans, p.memory_gb, f"projections ({', '.join(p.methods)})", on_part)
    full_dim = sum(kit.extraction.stored_dims)
    write_projections(job, p, full_dim, keys, outs, report.plan_seconds, train_ids, query_ids)
    mlrun.log_metrics(
        {
            "n_samples": len(train_ids) + len(query_ids),
            "seconds": report.seconds,
            "extract_seconds": report.extract_seconds,
            "groups": report.groups,
            "group_rows": report.group_rows,
            **projection_seconds(keys, report.plan_seconds),
        }
    )


Key = tuple[str, int, int]  # (method, k, seed) of a full-gradient projection


@contextlib.contextmanager
def projection_plans(
    job: JobContext, p, extraction, train_ids: list[str], query_ids: list[str]
) -> Iterator[tuple[list[Plan], list[Key], Callable | None]]:
    """(plans, their keys, on_part) of every configured full-gradient method at every k and seed,
    plus, where the job keeps select-then-project's blocks (output `blocks`), the `select_kind`
    plans whose blocks go to that parts file (shared with an equal full-gradient plan), the file
    open for writing while the context lasts. The first len(keys) plans are the keys'."""
    full_dim = sum(extraction.stored_dims)
    too_big = [k for k in p.dims if k > full_dim]
    if too_big:
        raise ValueError(f"config key projection.dims: {too_big} exceed the full gradient dimension {full_dim}")
    keys = [(m, k, seed) for m in p.methods if m != "select_then_project" for k in p.dims for seed in p.seeds]
    everything = tuple(extraction.names)
    plans = [Plan(method_config(m, k, seed, p.nonzeros), everything) for m, k, seed in keys]
    kept = _paths(job.output.get("blocks"))
    if not kept:
        yield plans, keys, None
        return
    part_keys = [(k, seed) for k in p.dims for seed in p.seeds]  # each component's block of the kind
    for k, seed in part_keys:
        cfg = ProjectionConfig(p.select_kind, k, seed, p.nonzeros)
        at = next((i for i, plan in enumerate(plans) if plan.cfg == cfg), None)
        if at is None:
            plans.append(Plan(cfg, everything, parts=True))
        else:
            plans[at] = Plan(cfg, everything, parts=True)
    column = {name: c for c, name in enumerate(everything)}
    with PartsWriter(
        kept[0],
        p.select_kind,
        p.nonzeros,
        everything,
        extraction.stored_dims,
        part_keys,
        train_ids,
        query_ids,
        model_fingerprint=model_fingerprint(p.model),
    ) as writer:

        def on_part(i: int, name: str, first: int, block, seconds: float) -> None:
            writer.add(plans[i].cfg.k, plans[i].cfg.seed, column[name], first, block, seconds)

        yield plans, keys, on_part


def write_projections(
    job: JobContext,
    p,
    full_dim: int,
    keys: list[Key],
    outs,
    seconds: list[float],
    train_ids: list[str],
    query_ids: list[str],
) -> None:
    """Each method's projection file (output `projection`, in p.methods' order) from the keys'
    results [n, out_dim] (training examples, then queries) and seconds."""
    n_train, n = len(train_ids), len(train_ids) + len(query_ids)
    methods = [m for m in p.methods if m != "select_then_project"]
    fingerprint = model_fingerprint(p.model)
    for i, method in enumerate(methods):
        with ProjectionWriter(
            job.output["projection"][i], method, train_ids, query_ids, full_dim=full_dim, model_fingerprint=fingerprint
        ) as writer:
            for (m, k, seed), out, spent in zip(keys, outs, seconds):
                if m == method:
                    writer.add(k, seed, out[:n_train], out[n_train:], spent / n)


def projection_seconds(keys: list[Key], seconds: list[float]) -> dict[str, float]:
    """MLflow metrics: each key's projection time."""
    return {f"seconds.{m}_k{k}_seed{s}": t for (m, k, s), t in zip(keys, seconds)}


def _paths(value) -> list[str]:
    """A named input/output as a list of paths (Snakemake gives one path or a list)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def main_selected_stream(job: JobContext, mlrun) -> None:
    """select-then-project of every setting: each split's greedy set, at every k and seed, summed
    from the components' blocks that `projection_stream` kept (tdabench.projection_parts): the
    numbers a pass over the model computes, with no pass."""
    p = job.typed_params(SelectedStreamParams)
    keys = [(k, seed) for k in p.dims for seed in p.seeds]
    with Parts(_paths(job.input["blocks"])[0]) as parts:
        parts.check(p.select_kind, p.nonzeros, keys)
        dims = {name: int(d) for name, d in zip(parts.components, parts.component_dims)}
        n_train = len(parts.train_ids)
        wanted = []  # (setting, split, k, seed, components)
        for setting, path in zip(p.settings, job.input["selection"]):
            selection = SelectionTable.read(path)
            for split in selection.splits:
                names = selection.greedy_set(split)
                dim = sum(dims[c] for c in names)
                for k in p.dims:
                    if k >= dim:  # projecting up (or to the same size) adds nothing over the selection itself
                        log.info("%s split %d: k=%d >= selected dim %d, skipped", setting, split, k, dim)
                        continue
                    wanted.extend((setting, split, k, seed, names) for seed in p.seeds)
        outs = {}  # (setting, split, k, seed) -> (projection [n, k], seconds)
        for k, seed in keys:
            if not any(w[2:4] == (k, seed) for w in wanted):
                continue
            blocks, seconds = parts.blocks(k, seed)  # [C, n, k], [C]
            for setting, split, k_, seed_, names in wanted:
                if (k_, seed_) == (k, seed):
                    at = positions(parts.components, names)
                    outs[setting, split, k, seed] = (select_sum(blocks, at), float(seconds[at].sum()))
            del blocks
        train_ids, query_ids = parts.train_ids, parts.query_ids
    n = len(train_ids) + len(query_ids)
    for setting, path in zip(p.settings, job.output["projection"]):
        with ProjectionWriter(path, "select_then_project", train_ids, query_ids, kind=p.select_kind) as writer:
            for s, split, k, seed, names in wanted:
                if s == setting:
                    out, t = outs[s, split, k, seed]
                    writer.add(k, seed, out[:n_train], out[n_train:], t / n, split=split, components=names)
    mlrun.log_metrics({"n_projections": len(wanted)})
