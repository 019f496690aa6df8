"""The results table: every method scored on the same held-out queries of each split.

Methods (column `method`; `variant` refines it):
  full                 all extracted components (the full gradient), exact cosine
  single               each component alone (`components` names it)
  family               fixed subsets: a family, the attention / MLP group, a layer (`variant`)
  best_single          the single component with the best objective on the selection queries
  greedy_step          the greedy subset after each step (`step`)
  greedy               the greedy prefix with the best objective on the selection queries
  greedy_budget        the best greedy prefix within a parameter budget (`budget`, a share)
  projection           random projection (`variant`: sjlt, gaussian, blockwise, ...) to `k` dims
  select_then_project  the split's greedy set, projected to `k` dims
  bm25                 text baseline (`variant`: prompt, prompt_response)
  chance               expected metrics of a uniformly random ranking
Every row carries `split`, its representation dimension `dim`, `bytes_per_sample` (float32), and
where measured `seconds_per_sample`: the time to represent one new sample (gradient extraction of
what the method needs + reduction). Each metric comes with a seeded percentile-bootstrap 95%
interval over the held-out queries (`<metric>_lo`, `<metric>_hi`); a second table holds every
query's rank and score margin per row, for drill-down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tdabench.components import short_name
from tdabench.io import read_parquet_checked, write_parquet
from tdabench.metrics import bootstrap_intervals, cosine_scores, retrieval_metrics, source_margins, source_ranks
from tdabench.projection_files import Projected
from tdabench.selection import SelectionTable, family_subsets
from tdabench.similarity import Similarity
from tdabench.tracking import default_tracking_uri, is_server

FLOAT_BYTES = 4
HEADLINE = ["full", "greedy", "greedy_budget", "best_single", "select_then_project", "projection", "bm25", "chance"]


def chance_metrics(n_columns: int, ks) -> dict[str, float]:
    ranks = np.arange(1, n_columns + 1)
    return {
        "top1": 1.0 / n_columns,
        "mrr": float(np.mean(1.0 / ranks)),
        **{f"recall_at_{k}": min(1.0, k / n_columns) for k in ks},
    }


def _columns(sim: Similarity, dense: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Scores over all training examples [Q', T] -> the scored columns (all, or the candidates)."""
    return dense if sim.candidates is None else np.take_along_axis(dense, sim.candidates[queries], axis=1)


@dataclass(frozen=True)
class Scoring:
    ks: tuple[int, ...]  # evaluation.recall_at
    n_boot: int  # evaluation.bootstrap
    boot_seed: int  # evaluation.bootstrap_seed


IN_SAMPLE = -1  # split of the in-sample table: every query, nothing chosen on them (the paper's metric)


def evaluate_split(
    sim: Similarity,
    setting: str,
    split: int,
    heldout: np.ndarray,
    selection: SelectionTable | None,
    projections: list[Projected],
    baselines: dict[str, np.ndarray],
    scoring: Scoring,
    candidates: np.ndarray | None = None,
) -> tuple[list[dict], list[dict]]:
    """(rows, per-query rows) of every method on the held-out queries of one split.
    `selection`: the setting's selection table (this split's choices are used); `baselines`: {variant: dense scores
    [Q, T]} of text baselines. `candidates` ([Q, b] training indices, e.g. BM25's top b with the
    source forced in; dense layout only) adds, beside every whole-corpus row (protocol `corpus`),
    the same method ranked within each query's candidates (protocol `candidates`). A store in the
    candidate layout ranks within its candidates only: its rows are protocol `candidates`.
    `selection` None (the in-sample table, split IN_SAMPLE, every query): only the methods that
    choose nothing on the queries (full, single, family, projections of the full gradient, BM25)."""
    targets = sim.targets(heldout)
    query_ids = [sim.query_ids[q] for q in heldout]
    params, dims = sim.component_params, sim.component_dim
    within_store = sim.n_columns if sim.candidates is not None else None  # b of a candidate-layout store
    base = {
        "setting": setting,
        "split": split,
        "n_queries": len(heldout),
        "n_train": len(sim.train_ids),
        "protocol": "corpus" if within_store is None else "candidates",
        "b": within_store,
    }
    rows, per_query = [], []
    if candidates is not None:
        if sim.candidates is not None:
            raise ValueError("candidates: the similarity store already ranks within candidates")
        cand = candidates[heldout]  # [Q', b]
        hit = cand == targets[:, None]
        if not hit.any(1).all():
            raise ValueError("candidates: every query's source must be among its candidates")
        cand_targets = hit.argmax(1)  # [Q']

    def metrics_of(scores: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, dict]:
        ranks = source_ranks(scores, tgt)
        return ranks, {
            **retrieval_metrics(ranks, scoring.ks),
            **bootstrap_intervals(ranks, scoring.ks, scoring.n_boot, scoring.boot_seed),
        }

    def score(row: dict, scores: np.ndarray) -> None:
        ranks, metrics = metrics_of(scores, targets)
        rows.append({**row, **metrics})
        if candidates is not None:
            within = np.take_along_axis(scores, cand, axis=1)  # [Q', b]
            rows.append({**row, "protocol": "candidates", "b": cand.shape[1], **metrics_of(within, cand_targets)[1]})
        keys = {k: row.get(k) for k in ("setting", "split", "method", "variant", "components", "k", "seed", "step")}
        per_query.extend(
            {**keys, "query_id": q, "rank": r, "margin": m}
            for q, r, m in zip(query_ids, ranks, source_margins(scores, targets))
        )

    def add(method: str, comps, scores: np.ndarray, **extra):
        comps = np.arange(len(sim.components)) if comps is None else np.asarray(comps)
        dim = extra.pop("dim", int(dims[comps].sum()))
        label = "all" if len(comps) == len(sim.components) else "+".join(short_name(sim.components[c]) for c in comps)
        score(
            {
                **base,
                "method": method,
                "components": label,
                "n_components": len(comps),
                "params": int(params[comps].sum()),
                "dim": dim,
                "bytes_per_sample": dim * FLOAT_BYTES,
                **extra,
            },
            scores,
        )

    add("full", None, sim.scores(None, heldout))
    for c in range(len(sim.components)):
        add("single", [c], sim.scores([c], heldout))
    for name, idx in family_subsets(sim):
        add("family", idx, sim.scores(idx, heldout), variant=name)

    if selection is None:
        projections = [p for p in projections if p.split is None]
    else:
        add_selected(sim, split, heldout, selection, add)
    _add_projections(sim, split, heldout, projections, add)
    empty = {"components": "", "n_components": 0, "params": 0, "dim": 0, "bytes_per_sample": 0}
    for variant, dense in baselines.items():
        score({**base, **empty, "method": "bm25", "variant": variant}, _columns(sim, dense[heldout], heldout))
    for protocol, n, b in [(base["protocol"], sim.n_columns, within_store)] + (
        [("candidates", cand.shape[1], cand.shape[1])] if candidates is not None else []
    ):
        chance = chance_metrics(n, scoring.ks)
        rows.append(
            {
                **base,
                **empty,
                "protocol": protocol,
                "b": b,
                "method": "chance",
                **chance,
                **{f"{m}_{b}": v for m, v in chance.items() for b in ("lo", "hi")},
            }
        )
    return rows, per_query


def add_selected(sim: Similarity, split: int, heldout: np.ndarray, selection: SelectionTable, add) -> None:
    """The methods chosen on the split's selection queries: best single, greedy steps, budgets."""
    best = sim.component_index(selection.best_single(split))
    add("best_single", best, sim.scores(best, heldout))
    order = sim.component_index(selection.greedy_order(split))
    chosen_steps = selection.greedy_chosen_steps(split)
    for step in range(1, len(order) + 1):
        scores = sim.scores(order[:step], heldout)
        add("greedy_step", order[:step], scores, step=step)
        if step == chosen_steps:
            add("greedy", order[:step], scores, step=step)
    for budget, names in selection.budget_sets(split):
        subset = sim.component_index(names)
        add(
            "greedy_budget",
            subset,
            sim.scores(subset, heldout),
            step=len(names),
            budget=budget,
            variant=f"budget {budget:g}",
        )


def _add_projections(sim: Similarity, split: int, heldout: np.ndarray, projections: list[Projected], add) -> None:
    for p in projections:
        if p.split is not None and p.split != split:
            continue
        scores = _columns(sim, cosine_scores(p.queries[heldout], p.train), heldout)
        method = "projection" if p.split is None else "select_then_project"
        comps = None if p.split is None else sim.component_index(p.components)
        add(method, comps, scores, variant=p.method, k=p.k, seed=p.seed, dim=p.train.shape[1])


PER_QUERY_SCHEMA = {
    "setting": pl.Utf8,
    "split": pl.Int64,
    "method": pl.Utf8,
    "variant": pl.Utf8,
    "components": pl.Utf8,
    "k": pl.Int64,
    "seed": pl.Int64,
    "step": pl.Int64,
    "query_id": pl.Utf8,
    "rank": pl.Float64,
    "margin": pl.Float64,
}


def tidy(rows: list[dict], ks: list[int], costs: pl.DataFrame | None = None) -> pl.DataFrame:
    metrics = ["top1", "mrr", *[f"recall_at_{k}" for k in ks]]
    schema = {
        "setting": pl.Utf8,
        "protocol": pl.Utf8,
        "split": pl.Int64,
        "method": pl.Utf8,
        "variant": pl.Utf8,
        "components": pl.Utf8,
        "n_components": pl.Int64,
        "params": pl.Int64,
        "step": pl.Int64,
        "budget": pl.Float64,
        "k": pl.Int64,
        "seed": pl.Int64,
        "dim": pl.Int64,
        "bytes_per_sample": pl.Int64,
        "n_queries": pl.Int64,
        "n_train": pl.Int64,
        "b": pl.Int64,
        **{m: pl.Float64 for m in metrics},
        **{f"{m}_{b}": pl.Float64 for m in metrics for b in ("lo", "hi")},
    }
    table = pl.DataFrame([{key: r.get(key) for key in schema} for r in rows], schema=schema)
    if costs is None or costs.is_empty():
        return table.with_columns(pl.lit(None, dtype=pl.Float64).alias("seconds_per_sample"))
    keys = ["setting", "method", "variant", "k", "budget"]
    per_method = costs.select(*keys, "seconds_per_sample")
    return table.join(per_method, on=keys, how="left", nulls_equal=True)


# The results tables (results/evaluation/metrics.parquet: protocol corpus; candidates.parquet:
# protocol candidates) have the columns of `tidy`; per_query.parquet has PER_QUERY_SCHEMA.
RESULTS_REQUIRED = (
    "setting",
    "protocol",
    "split",
    "method",
    "variant",
    "components",
    "k",
    "budget",
    "dim",
    "top1",
    "mrr",
    "seconds_per_sample",
)


def write_results(table: pl.DataFrame, path: str | Path) -> None:
    write_parquet(table, path)


def read_results(path: str | Path) -> pl.DataFrame:
    return read_parquet_checked(path, RESULTS_REQUIRED, "results table")


def write_per_query(rows: list[dict], path: str | Path) -> None:
    write_parquet(pl.DataFrame(rows, schema=PER_QUERY_SCHEMA), path)


def headline(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (setting, method, variant, k, budget) of the headline methods: mean over splits
    (and projection seeds), with the standard deviation of top-1 and MRR."""
    metrics = [c for c in table.columns if c in ("top1", "mrr") or c.startswith("recall_at_")]
    keys = ["setting", "method", "variant", "k", "budget"]
    agg = (
        table.filter(pl.col("method").is_in(HEADLINE))
        .group_by(keys, maintain_order=True)
        .agg(
            *[pl.col(m).mean() for m in metrics],
            pl.col("top1").std().alias("top1_sd"),
            pl.col("mrr").std().alias("mrr_sd"),
            *[pl.col(f"{m}_{b}").mean() for m in ("top1", "mrr") for b in ("lo", "hi")],
            pl.len().cast(pl.Int64).alias("n_runs"),
            pl.col("dim").mean().round().cast(pl.Int64),
            pl.col("n_components").mean().alias("n_components"),
            pl.col("components").first(),
            pl.col("seconds_per_sample").first(),
            pl.col("n_queries").first(),
            pl.col("n_train").first(),
        )
    )
    order = {m: i for i, m in enumerate(HEADLINE)}
    return (
        agg.with_columns(pl.col("method").replace_strict(order, default=99).alias("_o"))
        .sort("setting", "_o", "variant", "dim", nulls_last=True)
        .drop("_o")
    )


def _fmt(value, sd=None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" + (f" ± {sd:.3f}" if sd is not None and sd == sd else "")


def _candidates_markdown(candidates: pl.DataFrame) -> list[str]:
    head = headline(candidates)
    b = int(candidates["b"].max())
    lines = [
        f"## Candidate protocol: ranking within BM25's top {b}",
        "",
        f"As published: per query the top {b} training examples by BM25 over training prompts (query: the "
        "query prompt), the source forced into the last slot when BM25 missed it. Mean over splits.",
        "",
        "| setting | method | variant | dim | top-1 | MRR |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in head.iter_rows(named=True):
        label = r["method"] + (f" k={r['k']}" if r["k"] is not None else "")
        lines.append(
            f"| {r['setting']} | {label} | {r['variant'] or ''} | {r['dim']} | "
            f"{_fmt(r['top1'], r['top1_sd'])} | {_fmt(r['mrr'], r['mrr_sd'])} |"
        )
    return lines + [""]


def _in_sample_markdown(in_sample: pl.DataFrame) -> list[str]:
    """The paper's metric: every query scored, nothing chosen on them; the best single component
    is picked on the same queries (in-sample, as the paper's per-component table)."""
    lines = [
        "## In-sample over all queries (the paper's metric)",
        "",
        "Every query of the setting scored once, by the methods that choose nothing on the queries. The best "
        "single component here is the best on these same queries: in-sample, unlike `best_single` above.",
        "",
        "| setting | protocol | queries | full gradient top-1 | MRR | best single component (in-sample) | top-1 "
        "| BM25 over prompts top-1 |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for (setting, protocol, b), part in in_sample.group_by("setting", "protocol", "b", maintain_order=True):
        full = part.filter(pl.col("method") == "full").row(0, named=True)
        single = part.filter(pl.col("method") == "single").sort("top1", "mrr", descending=True).row(0, named=True)
        bm25 = part.filter((pl.col("method") == "bm25") & (pl.col("variant") == "prompt"))
        where = "whole corpus" if protocol == "corpus" else f"within {b} candidates"
        lines.append(
            f"| {setting} | {where} | {full['n_queries']} | {full['top1']:.3f} | {full['mrr']:.3f} | "
            f"{single['components']} | {single['top1']:.3f} | {bm25['top1'][0]:.3f} |"
        )
    return lines + [""]


def unmet_budgets(table: pl.DataFrame, budgets) -> list[float]:
    """Configured parameter budgets (selection.budgets) with no result: no component fits them."""
    met = set(table.filter(pl.col("method") == "greedy_budget")["budget"].drop_nulls().to_list())
    return [float(b) for b in budgets if float(b) not in met]


SELECTIONS = ("greedy", "greedy_budget", "best_single")  # component selection (select)


def answer_lines(table: pl.DataFrame) -> list[str]:
    """The study's answer in a few console lines, one per setting: top-1 of the full gradient, of
    the best selection, of the best projection at the largest k, and of the best BM25 variant."""
    head = headline(table)
    lines = []
    for setting in table["setting"].unique(maintain_order=True):  # the config's order
        rows = head.filter(pl.col("setting") == setting)

        def best(frame: pl.DataFrame, name: str, detail) -> str | None:
            frame = frame.filter(pl.col("top1").is_not_nan())  # a NaN result is no one's best
            if frame.is_empty():
                return None
            r = frame.sort("top1", descending=True, maintain_order=True).row(0, named=True)
            what = ", ".join(x for x in (detail(r), r["dim"] and f"{r['dim']:,} dims") if x)
            return f"{name} {r['top1']:.3f} ({what})"

        proj = rows.filter(pl.col("method") == "projection")
        parts = [
            best(rows.filter(pl.col("method") == "full"), "full gradient", lambda r: ""),
            best(rows.filter(pl.col("method").is_in(SELECTIONS)), "best selection", lambda r: r["method"]),
            best(
                proj.filter(pl.col("k") == proj["k"].max()),
                "best projection",
                lambda r: f"{r['variant']} k={r['k']}",
            ),
            best(rows.filter(pl.col("method") == "bm25"), "BM25", lambda r: r["variant"]),
        ]
        lines.append(f"{setting}: top-1 " + " · ".join(p for p in parts if p))
    return lines


ANSWER = "results/answer.txt"


def answer_text(mlflow_config: dict, path: str | Path = ANSWER) -> str:
    """What the end of a study prints: the answer lines the summary wrote (when they are not older
    than the metrics they come from) and where the report and the MLflow UI are; "" before a summary."""
    path = Path(path)
    metrics = path.parent / "evaluation" / "metrics.parquet"
    if not path.is_file() or (metrics.is_file() and metrics.stat().st_mtime > path.stat().st_mtime):
        return ""
    lines = [f"[tdabench] {line}" for line in path.read_text().splitlines() if line]
    uri = mlflow_config["tracking_uri"]
    if is_server(uri):
        ui = uri
    elif uri is None and Path("Makefile").is_file():  # the checkout's own workdir
        ui = "make ui"
    else:
        ui = f"mlflow ui --backend-store-uri {uri or default_tracking_uri(Path.cwd())}"
    where = f"[tdabench] report: {path.parent / 'summary.md'}"
    if mlflow_config["enabled"]:
        where += f"   MLflow UI: {ui}"
    return "\n".join([*lines, where]) + "\n"


def summary_markdown(
    table: pl.DataFrame,
    plot_paths: list[str] | None = None,
    candidates: pl.DataFrame | None = None,
    in_sample: pl.DataFrame | None = None,
) -> str:
    head = headline(table)
    lines = [
        "# tdabench summary",
        "",
        "Retrieval of each held-out query's source training example (higher is better), mean ± sd over "
        "the selection/held-out splits (and projection seeds). `greedy`, `greedy_budget` and `best_single` "
        "were chosen on each split's selection queries only. `time/sample`: time to represent one new sample "
        "(gradient extraction of what the method needs + reduction, measured on the same queries).",
        "",
    ]
    recall = [c for c in head.columns if c.startswith("recall_at_") and not c.endswith(("_lo", "_hi"))]
    for setting in head["setting"].unique(maintain_order=True).to_list():
        part = head.filter(pl.col("setting") == setting)
        first = part.row(0, named=True)
        lines += [
            f"## {setting}",
            "",
            f"{first['n_queries']} held-out queries per split, {first['n_train']} training examples.",
            "",
            "| method | variant | components | dim | top-1 | MRR | " + " | ".join(recall) + " | time/sample | runs |",
            "|---|---|---|---:|---:|---:|" + "---:|" * len(recall) + "---:|---:|",
        ]
        for r in part.iter_rows(named=True):
            label = r["method"] + (f" k={r['k']}" if r["k"] is not None else "")
            comps = r["components"] or ""
            if len(comps) > 48:
                comps = f"{r['n_components']:.3g} components"
            cost = f"{r['seconds_per_sample'] * 1e3:.2f} ms" if r["seconds_per_sample"] is not None else ""
            lines.append(
                f"| {label} | {r['variant'] or ''} | {comps} | {r['dim']} | {_fmt(r['top1'], r['top1_sd'])} | "
                f"{_fmt(r['mrr'], r['mrr_sd'])} | "
                + " | ".join(_fmt(r[m]) for m in recall)
                + f" | {cost} | {r['n_runs']} |"
            )
        lines.append("")
    if candidates is not None and not candidates.is_empty():
        lines += _candidates_markdown(candidates)
    if in_sample is not None and not in_sample.is_empty():
        lines += _in_sample_markdown(in_sample)
    for path in plot_paths or []:
        lines += [f"![{path}]({path})", ""]
    return "\n".join(lines)
