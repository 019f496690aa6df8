"""Stage `selection`: for each selection/held-out split, the best single component, greedy forward
selection run to the end, and greedy selection within each parameter budget (its best prefix)."""

from __future__ import annotations

import logging

from tdabench.contracts import SelectionParams
from tdabench.pipeline.common import JobContext
from tdabench.selection import SelectionTable, selection_rows, split_queries
from tdabench.similarity import load_similarity

log = logging.getLogger(__name__)


def main(job: JobContext, mlrun) -> None:
    p, setting = job.typed_params(SelectionParams), job.wildcards["setting"]
    sim = load_similarity(job.input["similarity"])
    rows = []
    for split in range(p.n_splits):
        sel, _ = split_queries(sim.query_ids, p.selection_fraction, p.split_seed + split)
        rows += selection_rows(sim, split, sel, p.objective, list(p.budgets))
    table = SelectionTable.from_rows(rows, setting, p.objective)
    table.write(job.output["selection"])
    # The greedy curve of every split as a stepped MLflow metric (the UI plots it against the step).
    for split in table.splits:
        for r in table.greedy_steps(split).iter_rows(named=True):
            mlrun.log_metrics({f"greedy_{p.objective}_split{split}": r["objective"]}, step=r["step"])
    chosen = [table.greedy_chosen_steps(s) for s in table.splits]
    mlrun.log_metrics({"greedy_chosen_steps_mean": sum(chosen) / len(chosen), "n_splits": p.n_splits})
    mlrun.log_table(table.table, "selection.json")
