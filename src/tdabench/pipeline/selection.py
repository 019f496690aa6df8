"""Stage `selection`: for each selection/held-out split, the best single component, greedy forward
selection run to the end, and greedy selection within each parameter budget (its best prefix)."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from tdabench.io import write_parquet
from tdabench.pipeline.common import JobContext
from tdabench.selection import best_prefix, best_single, greedy_forward, single_component_objectives, split_queries
from tdabench.similarity import load_similarity

log = logging.getLogger(__name__)
SCHEMA = {"split": pl.Int64, "kind": pl.Utf8, "step": pl.Int64, "component": pl.Utf8, "params": pl.Int64,
          "params_cum": pl.Int64, "objective": pl.Float64, "chosen": pl.Boolean, "budget": pl.Float64}


def split_rows(sim, split: int, sel: np.ndarray, objective: str, budgets: list[float]) -> list[dict]:
    params = sim.component_params
    singles = single_component_objectives(sim, sel, objective)
    chosen_single = best_single(sim, sel, objective)
    steps = greedy_forward(sim, sel, objective)
    n_best = best_prefix(steps, sim)
    rows = [{"split": split, "kind": "single", "component": sim.components[c], "params": int(params[c]),
             "params_cum": int(params[c]), "objective": float(singles[c]), "chosen": c == chosen_single}
            for c in range(len(sim.components))]
    cum = np.cumsum([params[s.component] for s in steps])
    rows += [{"split": split, "kind": "greedy", "step": s.step, "component": sim.components[s.component],
              "params": int(params[s.component]), "params_cum": int(cum[i]), "objective": s.objective,
              "chosen": s.step == n_best} for i, s in enumerate(steps)]
    total = int(params.sum())
    for budget in budgets:  # greedy among the components that still fit, then its best prefix
        b_steps = greedy_forward(sim, sel, objective, max_params=budget * total)
        n = best_prefix(b_steps, sim)
        b_cum = np.cumsum([params[s.component] for s in b_steps])
        rows += [{"split": split, "kind": "budget", "budget": budget, "step": s.step,
                  "component": sim.components[s.component], "params": int(params[s.component]),
                  "params_cum": int(b_cum[i]), "objective": s.objective, "chosen": s.step == n}
                 for i, s in enumerate(b_steps)]
        if not b_steps:
            log.warning("split %d: no component fits the budget %g of the parameters", split, budget)
    log.info("split %d: best single %s; greedy chose %d steps (%s %.3f on %d selection queries)", split,
             sim.components[chosen_single], n_best, objective, steps[n_best - 1].objective, len(sel))
    return rows


def main(job: JobContext, mlrun) -> None:
    p, setting = job.params, job.wildcards["setting"]
    sim = load_similarity(job.input["similarity"])
    rows = []
    for split in range(p["n_splits"]):
        sel, _ = split_queries(sim.query_ids, p["selection_fraction"], p["split_seed"] + split)
        rows += split_rows(sim, split, sel, p["objective"], p["budgets"])
    table = pl.DataFrame(rows, schema=SCHEMA).with_columns(
        pl.lit(setting).alias("setting"), pl.lit(p["objective"]).alias("objective_name"))
    write_parquet(table, job.output["selection"])
    first = table.filter((pl.col("split") == 0) & (pl.col("kind") == "greedy"))
    for r in first.iter_rows(named=True):
        mlrun.log_metrics({f"greedy_{p['objective']}_split0": r["objective"]}, step=r["step"])
    chosen = table.filter((pl.col("kind") == "greedy") & pl.col("chosen"))
    mlrun.log_metrics({"greedy_chosen_steps_mean": float(chosen["step"].mean()), "n_splits": p["n_splits"]})
