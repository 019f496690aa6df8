"""Stage `selection`: best single component and greedy forward selection on the selection queries."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from tdabench.io import write_parquet
from tdabench.pipeline.common import JobContext
from tdabench.selection import best_prefix, best_single, greedy_forward, single_component_objectives, split_queries
from tdabench.similarity import load_similarity

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p, setting = job.params, job.wildcards["setting"]
    sim = load_similarity(job.input["similarity"])
    sel, held = split_queries(sim.query_ids, p["selection_fraction"], p["split_seed"])
    objective = p["objective"]
    log.info("%s: %d selection / %d held-out queries, objective %s", setting, len(sel), len(held), objective)

    singles = single_component_objectives(sim, sel, objective)
    chosen_single = best_single(sim, sel, objective)
    steps = greedy_forward(sim, sel, objective)
    n_best = best_prefix(steps, sim)
    params = sim.component_params
    rows = [{"kind": "single", "step": None, "component": sim.components[c], "params": int(params[c]),
             "params_cum": int(params[c]), "objective": float(singles[c]), "chosen": c == chosen_single}
            for c in range(len(sim.components))]
    cum = np.cumsum([params[s.component] for s in steps])
    rows += [{"kind": "greedy", "step": s.step, "component": sim.components[s.component],
              "params": int(params[s.component]), "params_cum": int(cum[i]), "objective": s.objective,
              "chosen": s.step == n_best} for i, s in enumerate(steps)]
    table = pl.DataFrame(rows, schema={"kind": pl.Utf8, "step": pl.Int64, "component": pl.Utf8, "params": pl.Int64,
                                       "params_cum": pl.Int64, "objective": pl.Float64, "chosen": pl.Boolean})
    table = table.with_columns(pl.lit(setting).alias("setting"), pl.lit(objective).alias("objective_name"),
                               pl.lit(len(sel)).alias("n_selection_queries"))
    write_parquet(table, job.output["selection"])
    for s in steps:
        mlrun.log_metrics({f"greedy_{objective}": s.objective}, step=s.step)
    mlrun.log_metrics({"greedy_chosen_steps": n_best, f"best_single_{objective}": float(singles[chosen_single]),
                       "n_selection_queries": len(sel)})
    log.info("best single: %s; greedy chose %d steps", sim.components[chosen_single], n_best)
