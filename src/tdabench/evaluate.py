"""The results table: every method scored on the same held-out queries.

Methods (column `method`):
  full          all extracted components (the full gradient), exact cosine
  single        each component alone (column `components` names it)
  best_single   the single component with the best objective on the selection queries
  greedy_step   the greedy subset after each step (column `step`)
  greedy        the greedy prefix with the best objective on the selection queries
  projection    random projection of the full gradient to `k` dims (columns `k`, `seed`)
  chance        expected metrics of a uniformly random ranking
Every row carries its representation dimension `dim` and `bytes_per_sample` (float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from tdabench.components import short_name
from tdabench.metrics import cosine_scores, retrieval_metrics, source_ranks
from tdabench.similarity import Similarity

FLOAT_BYTES = 4


@dataclass(frozen=True)
class Projected:
    """Projected full gradients of one (k, seed): train [T, k] and the setting's queries [Q, k]."""
    kind: str
    k: int
    seed: int
    train: np.ndarray
    queries: np.ndarray
    seconds_per_sample: float


def chance_metrics(n_train: int, ks) -> dict[str, float]:
    ranks = np.arange(1, n_train + 1)
    return {"top1": 1.0 / n_train, "mrr": float(np.mean(1.0 / ranks)),
            **{f"recall_at_{k}": min(1.0, k / n_train) for k in ks}}


def evaluate_setting(sim: Similarity, setting: str, selection: pl.DataFrame, projections: list[Projected],
                     heldout: np.ndarray, ks: list[int]) -> pl.DataFrame:
    """One row per method (and component / step / k and seed) on the held-out queries."""
    gt = sim.ground_truth[heldout]
    params = sim.component_params
    rows = []

    def add(method: str, comps: list[int] | None, scores: np.ndarray, **extra):
        names = sim.components if comps is None else [sim.components[c] for c in comps]
        dim = int(params.sum() if comps is None else params[comps].sum())
        rows.append({
            "setting": setting, "method": method,
            "components": "all" if comps is None else "+".join(short_name(n) for n in names),
            "n_components": len(names), "dim": dim, "bytes_per_sample": dim * FLOAT_BYTES,
            "n_queries": len(heldout), "n_train": len(sim.train_ids), **extra,
            **retrieval_metrics(source_ranks(scores, gt), ks),
        })

    add("full", None, sim.scores(None, heldout))
    for c in range(len(sim.components)):
        add("single", [c], sim.scores([c], heldout))
    singles = selection.filter(pl.col("kind") == "single")
    best = singles.filter(pl.col("chosen"))["component"].to_list()
    best_idx = list(sim.component_index(best))
    add("best_single", best_idx, sim.scores(best_idx, heldout))

    greedy = selection.filter(pl.col("kind") == "greedy").sort("step")
    order = list(sim.component_index(greedy["component"].to_list()))
    for step, chosen in zip(greedy["step"].to_list(), greedy["chosen"].to_list()):
        subset = order[:step]
        scores = sim.scores(subset, heldout)
        add("greedy_step", subset, scores, step=step)
        if chosen:
            add("greedy", subset, scores, step=step)

    for p in projections:
        ranks = source_ranks(cosine_scores(p.queries[heldout], p.train), gt)
        rows.append({
            "setting": setting, "method": "projection", "components": f"all->{p.kind}",
            "n_components": len(sim.components), "k": p.k, "seed": p.seed, "dim": p.k,
            "bytes_per_sample": p.k * FLOAT_BYTES, "n_queries": len(heldout), "n_train": len(sim.train_ids),
            "seconds_per_sample": p.seconds_per_sample, **retrieval_metrics(ranks, ks),
        })
    rows.append({"setting": setting, "method": "chance", "components": "", "n_components": 0,
                 "dim": 0, "bytes_per_sample": 0, "n_queries": len(heldout), "n_train": len(sim.train_ids),
                 **chance_metrics(len(sim.train_ids), ks)})
    return tidy(rows, ks)


def tidy(rows: list[dict], ks: list[int]) -> pl.DataFrame:
    schema = {
        "setting": pl.Utf8, "method": pl.Utf8, "components": pl.Utf8, "n_components": pl.Int64,
        "step": pl.Int64, "k": pl.Int64, "seed": pl.Int64, "dim": pl.Int64,
        "bytes_per_sample": pl.Int64, "n_queries": pl.Int64, "n_train": pl.Int64, "seconds_per_sample": pl.Float64,
        "top1": pl.Float64, "mrr": pl.Float64, **{f"recall_at_{k}": pl.Float64 for k in ks},
    }
    return pl.DataFrame([{key: r.get(key) for key in schema} for r in rows], schema=schema)


def headline(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (setting, method) for summaries: projections averaged over seeds per k."""
    metrics = [c for c in table.columns if c in ("top1", "mrr") or c.startswith("recall_at_")]
    fixed = table.filter(pl.col("method").is_in(["full", "best_single", "greedy", "chance"]))
    fixed = fixed.with_columns(pl.lit(None, dtype=pl.Float64).alias("top1_sd"),
                               pl.lit(1, dtype=pl.Int64).alias("n_seeds"))
    proj = (
        table.filter(pl.col("method") == "projection")
        .group_by("setting", "method", "k", "dim", maintain_order=True)
        .agg(*[pl.col(m).mean() for m in metrics], pl.col("top1").std().alias("top1_sd"),
             pl.len().cast(pl.Int64).alias("n_seeds"), pl.col("components").first(),
             pl.col("n_components").first())
    )
    cols = ["setting", "method", "components", "n_components", "k", "dim", *metrics, "top1_sd", "n_seeds"]
    order = {"full": 0, "greedy": 1, "best_single": 2, "projection": 3, "chance": 4}
    both = pl.concat([fixed.select(cols), proj.select(cols)], how="vertical_relaxed")
    return both.with_columns(pl.col("method").replace_strict(order, default=9).alias("_o")) \
               .sort("setting", "_o", "dim").drop("_o")


def summary_markdown(table: pl.DataFrame, plot_path: str | None = None) -> str:
    head = headline(table)
    lines = ["# tdabench summary", "",
             "Retrieval of each held-out query's source training example by cosine similarity of "
             "per-sample loss gradients (higher is better). `greedy` and `best_single` were chosen on "
             "the separate selection queries. Projections: mean over seeds (sd of top-1 in brackets).", ""]
    metrics = [c for c in head.columns if c in ("top1", "mrr") or c.startswith("recall_at_")]
    for setting in head["setting"].unique(maintain_order=True).to_list():
        part = head.filter(pl.col("setting") == setting)
        first = table.filter(pl.col("setting") == setting).row(0, named=True)
        lines += [f"## {setting}", "",
                  f"{first['n_queries']} held-out queries, {first['n_train']} training examples.", "",
                  "| method | components | dim | " + " | ".join(metrics) + " |",
                  "|---|---|---:|" + "---:|" * len(metrics)]
        for r in part.iter_rows(named=True):
            label = r["method"] + (f" k={r['k']}" if r["k"] is not None else "")
            comps = r["components"] if len(r["components"] or "") <= 60 else f"{r['n_components']} components"
            vals = []
            for m in metrics:
                v = f"{r[m]:.3f}"
                if m == "top1" and r["top1_sd"] is not None:
                    v += f" ({r['top1_sd']:.3f})"
                vals.append(v)
            lines.append(f"| {label} | {comps} | {r['dim']} | " + " | ".join(vals) + " |")
        lines.append("")
    if plot_path:
        lines += [f"![top-1 against representation dimension]({plot_path})", ""]
    return "\n".join(lines)
