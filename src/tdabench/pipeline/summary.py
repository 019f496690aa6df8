"""Stage `summary`: summary.md and plots; headline metrics, table and plots into the parent run."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import polars as pl
import yaml

from tdabench import numerics, tracking
from tdabench.contracts import SummaryParams
from tdabench.evaluate import answer_lines, headline, read_results, summary_markdown, unmet_budgets
from tdabench.io import write_json, write_text
from tdabench.manifest import build_manifest, write_manifest
from tdabench.pipeline.common import ENVIRONMENT_DIR, JobContext
from tdabench.plots import plot_greedy_curve, plot_metric_vs_cost, plot_metric_vs_dim, plot_single_heatmap
from tdabench.similarity import read_provenance

log = logging.getLogger(__name__)


def headline_metrics(table: pl.DataFrame) -> dict[str, float]:
    """Flat MLflow metric names: `paraphrased.greedy.top1`, `paraphrased.projection_gaussian_k256.mrr`, ..."""
    out = {}
    for r in headline(table).iter_rows(named=True):
        name = r["method"]
        if r["variant"] and r["method"] in ("projection", "bm25", "greedy_budget"):
            name += f"_{r['variant']}"
        if r["k"] is not None:
            name += f"_k{r['k']}"
        name = re.sub(r"[^\w.\-/]", "_", f"{r['setting']}.{name}")
        for m in ("top1", "mrr", *[c for c in r if c.startswith("recall_at_")]):
            out[f"{name}.{m}"] = r[m]
        out[f"{name}.dim"] = r["dim"]
        if r["seconds_per_sample"] is not None:
            out[f"{name}.ms_per_sample"] = r["seconds_per_sample"] * 1e3
    return out


APPROACH = {  # the study's question: select components, or project the whole gradient?
    "full": "full",
    "greedy": "select",
    "greedy_budget": "select",
    "best_single": "select",
    "projection": "project",
    "select_then_project": "select+project",
    "bm25": "baseline",
    "chance": "baseline",
}


def method_run_name(r: dict) -> str:
    """`greedy · paraphrased`, `sjlt k=4096 · model_generated`, `bm25 prompt · paraphrased`: the
    method first, so a truncated Run Name column still tells runs apart."""
    what = r["variant"] if r["method"] == "projection" else r["method"]
    if r["method"] in ("bm25", "greedy_budget") and r["variant"]:
        what = f"{r['method']} {r['variant'].removeprefix('budget ')}"
    if r["k"] is not None:
        what += f" k={r['k']}"
    return f"{what} · {r['setting']}"


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(float(x), 2)


def method_params(r: dict) -> dict:
    """Params of a method run, numbers as numbers; a param that does not apply is left out (not
    "" or 0), so the UI's charts and parallel coordinates read them as numeric."""
    params = {"setting": r["setting"], "method": r["method"], "approach": APPROACH.get(r["method"], r["method"])}
    if r["variant"]:
        params["variant"] = r["variant"]
    for key in ("k", "budget"):
        if r[key] is not None:
            params[key] = _number(r[key])
    if r["dim"]:  # bm25 and chance represent nothing
        params |= {"dim": int(r["dim"]), "n_components": _number(r["n_components"]), "components": r["components"]}
    params["n_runs"] = int(r["n_runs"])
    return params


def greedy_prefixes(table: pl.DataFrame) -> dict[str, list[tuple[int, float, float]]]:
    """{setting: [(mean dim, top1, mrr) of each greedy prefix length]}: means over splits."""
    steps = (
        table.filter(pl.col("method") == "greedy_step")
        .group_by("setting", "step", maintain_order=True)
        .agg(pl.col("dim").mean(), pl.col("top1", "mrr").mean())
        .sort("setting", "step")
    )
    out: dict[str, list] = {}
    for r in steps.iter_rows(named=True):
        out.setdefault(r["setting"], []).append((round(r["dim"]), r["top1"], r["mrr"]))
    return out


def log_method_runs(mlrun, table: pl.DataFrame) -> None:
    """One nested run per evaluated headline method (setting, method, variant, k, budget), so the
    MLflow UI compares methods within and across invocations. Each logs its metrics at step =
    its dimension, and `<setting>/top1_vs_dim` (`mrr_vs_dim`) too: the chart view's x-axis is the
    step, so one chart per setting holds selection and projection against the dimension (the
    greedy run adds its prefixes there as a curve)."""
    prefixes = greedy_prefixes(table)
    for r in headline(table).iter_rows(named=True):
        metrics = {m: r[m] for m in r if m in ("top1", "mrr") or m.startswith(("recall_at_", "top1_", "mrr_"))}
        if r["seconds_per_sample"] is not None:
            metrics["ms_per_sample"] = r["seconds_per_sample"] * 1e3
        metrics = {k: v for k, v in metrics.items() if v is not None and v == v}
        top1_key, mrr_key = f"{r['setting']}/top1_vs_dim", f"{r['setting']}/mrr_vs_dim"
        steps = {}  # step (a dimension) -> metrics at it
        if r["dim"]:
            metrics["dim"] = r["dim"]
            steps[int(r["dim"])] = {top1_key: r["top1"], mrr_key: r["mrr"]}
        if r["method"] == "greedy":
            for dim, top1, mrr in prefixes.get(r["setting"], []):
                steps.setdefault(dim, {}).update({top1_key: top1, mrr_key: mrr})
        params = method_params(r)
        mlrun.child(
            method_run_name(r),
            params,
            metrics,
            tags={"tdabench.kind": "method", "tdabench.approach": params["approach"]},
            step=int(r["dim"] or 0),
            curves=steps,
        )


def log_curves(run, table: pl.DataFrame) -> None:
    """Curves as stepped metrics, which the MLflow UI plots against the step: top-1 and MRR of each
    projection against k (`paraphrased.sjlt.top1_vs_k`), and of the greedy prefix against its
    length (`paraphrased.greedy.top1_vs_step`); means over splits and seeds."""
    proj = (
        table.filter(pl.col("method").is_in(["projection", "select_then_project"]))
        .group_by("setting", "variant", "k", maintain_order=True)
        .agg(pl.col("top1", "mrr").mean())
    )
    for r in proj.iter_rows(named=True):
        name = re.sub(r"[^\w.\-/]", "_", f"{r['setting']}.{r['variant']}")
        run.log_metrics({f"{name}.top1_vs_k": r["top1"], f"{name}.mrr_vs_k": r["mrr"]}, step=int(r["k"]))
    steps = (
        table.filter(pl.col("method") == "greedy_step")
        .group_by("setting", "step", maintain_order=True)
        .agg(pl.col("top1", "mrr").mean())
    )
    for r in steps.iter_rows(named=True):
        run.log_metrics(
            {f"{r['setting']}.greedy.top1_vs_step": r["top1"], f"{r['setting']}.greedy.mrr_vs_step": r["mrr"]},
            step=int(r["step"]),
        )


def job_environments(folder: str | Path = ENVIRONMENT_DIR) -> dict[str, dict]:
    """The environment records of the jobs whose outputs are still there ({job: record}); a record
    whose outputs are gone belongs to a job this study no longer has."""
    records = {}
    for path in sorted(Path(folder).glob("*.json")):
        record = json.loads(path.read_text())
        if all(Path(o).exists() for o in record.get("outputs", [])):
            records[record["job"]] = record
    return records


def provenance(study_config: dict) -> dict:
    """What produced these results: commit, config hash and a digest of every stage's sources
    (tdabench.dev.docs flags README blocks whose code has changed since); the numerics mode, this
    host's environment and each model job's (CPU, kernel level, pins, threads, versions, GPU), so
    two runs that disagree show where their machines differ (`tdabench compare`)."""
    import tdabench
    from tdabench.config import config_hash
    from tdabench.pipeline.common import code_digest

    commit, dirty = tracking.git_commit(Path(tdabench.__file__).resolve().parents[2])
    return {
        "commit": commit,
        "dirty": dirty,
        "config_hash": config_hash(study_config),
        "code_digest": code_digest(),
        "numerics": study_config["numerics"],
        "environment": numerics.environment(),
        "jobs": job_environments(),
    }


def environment_tags(prov: dict) -> dict[str, str]:
    """The parent run's tags of a provenance record: the host's environment and threads per job."""
    env = prov["environment"]
    tags = {f"tdabench.env.{k}": json.dumps(v) if isinstance(v, dict) else str(v) for k, v in env.items()}
    threads = {name: job["threads"] for name, job in prov["jobs"].items()}
    tags["tdabench.env.threads_per_job"] = json.dumps(threads, sort_keys=True)
    hosts = {f"{job['cpu_model']} ({job['kernel_level']})" for job in prov["jobs"].values()}
    tags["tdabench.env.job_cpus"] = "; ".join(sorted(hosts))
    gpus = {job["gpu"] for job in prov["jobs"].values() if job.get("gpu")}
    tags["tdabench.env.job_gpus"] = "; ".join(sorted(gpus)) or "none"
    return tags


def main(job: JobContext, mlrun) -> None:
    p = job.typed_params(SummaryParams)
    order = {s: i for i, s in enumerate(p.settings)}
    table = read_results(job.input["metrics"]).sort(pl.col("setting").replace_strict(order), maintain_order=True)
    plots = [job.output[k] for k in ("plot_top1", "plot_mrr", "plot_heatmap", "plot_greedy", "plot_cost")]
    plot_metric_vs_dim(table, job.output["plot_top1"], "top1")
    plot_metric_vs_dim(table, job.output["plot_mrr"], "mrr")
    plot_single_heatmap(table, job.output["plot_heatmap"], "top1")
    plot_greedy_curve(table, job.output["plot_greedy"], "top1")
    plot_metric_vs_cost(table, job.output["plot_cost"], "top1")
    write_text(yaml.safe_dump(p.study_config, sort_keys=False), job.output["config"])
    prov = provenance(p.study_config)
    write_json(prov, job.output["provenance"])
    here = Path(job.output["summary"]).parent
    candidates = read_results(job.input["candidates"])
    stores = [f"- {setting}: {read_provenance(path)}" for setting, path in zip(p.settings, job.input["similarity"])]
    in_sample = read_results(job.input["in_sample"])
    text = summary_markdown(table, [os.path.relpath(p, here) for p in plots], candidates, in_sample)
    text += "\n## Similarity stores\n\n" + "\n".join(stores) + "\n"
    unmet = unmet_budgets(table, p.study_config["selection"]["budgets"])
    if unmet:  # asked for, but nothing to show: said here and on the console, not only in a job log
        note = (
            f"selection.budgets {unmet}: no component fits within that share of the parameters, so "
            "these budgets have no result; raise them above the smallest component's share"
        )
        text += f"\n## Not produced\n\n- {note}\n"
        log.warning("%s", note)
        print(f"[tdabench] summary: {note}", file=sys.__stderr__, flush=True)
    write_text(text, job.output["summary"])
    write_text("\n".join(answer_lines(table)) + "\n", job.output["answer"])  # printed at the study's end
    for line in stores:
        log.info("similarity store %s", line[2:])
    metrics = headline_metrics(table)
    if not candidates.is_empty():  # e.g. paraphrased.candidates.greedy.top1
        metrics |= {
            re.sub(r"^([^.]+)\.", r"\1.candidates.", name): v
            for name, v in headline_metrics(candidates).items()
            if name.endswith((".top1", ".mrr"))
        }
    full = in_sample.filter(pl.col("method") == "full")
    for r in full.iter_rows(named=True):  # e.g. paraphrased.in_sample.candidates.full.top1 (the paper's metric)
        metrics[f"{r['setting']}.in_sample.{r['protocol']}.full.top1"] = r["top1"]
    log_method_runs(mlrun, table)
    parent = tracking.parent()
    parent.set_tags(environment_tags(prov))
    parent.log_artifact(job.output["provenance"], "results")
    for run in (mlrun, parent):
        run.log_metrics(metrics)
        log_curves(run, table)
        run.log_table(headline(table), "results/headline.json")
        for path in (
            job.output["summary"],
            job.output["config"],
            *plots,
            job.input["metrics"],
            job.input["candidates"],
            job.input["in_sample"],
        ):
            run.log_artifact(path, "results")
    log.info("%d headline metrics logged%s", len(metrics), " to the parent run" if parent.active else "")
    manifest = build_manifest({"summary": [v for k, v in job.output.items() if k != "manifest"]})
    write_manifest(manifest, job.output["manifest"])
    log.info("results manifest: %d files -> %s", len(manifest["files"]), job.output["manifest"])
