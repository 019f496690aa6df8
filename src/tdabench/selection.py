"""Choosing components from the similarity store: query splits, best single, families, greedy
forward selection, and greedy selection within a parameter budget.

Choices are made on the *selection* queries only; every method is then scored on the held-out
rest (see tdabench.evaluate), so a selected subset is never graded on the queries that chose it.
Ties are broken deterministically: higher objective, then fewer parameters, then model order.
Objectives: top1, mrr (of the source's rank), or rho (agreement of the subset's scores with the
full gradient's scores over all scored pairs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tdabench.io import read_parquet_checked, write_parquet
from tdabench.metrics import objective_values
from tdabench.similarity import Similarity, cosine_from_sums

log = logging.getLogger(__name__)

# Objectives are compared after rounding, so that the same ranks summed in another order count as a tie.
_DECIMALS = 12
# Upper bound on candidates x queries x columns scores held at once during greedy selection.
_MAX_SCORES = 2**25


def split_queries(query_ids: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection, held-out) row indices of `query_ids`, each sorted; seeded, independent of input order."""
    n = len(query_ids)
    if n < 2:
        raise ValueError(f"need at least 2 queries to split into selection and held-out, got {n}")
    canonical = np.argsort(np.array(query_ids, dtype=object), kind="stable")
    order = canonical[np.random.default_rng(seed).permutation(n)]
    n_sel = min(n - 1, max(1, round(fraction * n)))
    return np.sort(order[:n_sel]), np.sort(order[n_sel:])


def _pick(values: np.ndarray, params: np.ndarray, index: np.ndarray) -> int:
    """Position of the best candidate: max value, then fewest params, then lowest model index."""
    order = np.lexsort((index, params, -np.round(values, _DECIMALS)))
    return int(order[0])


def _reference(sim: Similarity, queries: np.ndarray, objective: str) -> np.ndarray | None:
    return sim.scores(None, queries) if objective == "rho" else None


def single_component_objectives(sim: Similarity, queries: np.ndarray, objective: str) -> np.ndarray:
    """Objective of each component alone on `queries` -> [C]."""
    targets, ref = sim.targets(queries), _reference(sim, queries, objective)
    return np.array(
        [objective_values(sim.scores([c], queries), targets, objective, ref) for c in range(len(sim.components))]
    )


def best_single(sim: Similarity, queries: np.ndarray, objective: str) -> int:
    values = single_component_objectives(sim, queries, objective)
    idx = np.arange(len(values))
    return int(idx[_pick(values, sim.component_params, idx)])


def family_subsets(sim: Similarity) -> list[tuple[str, np.ndarray]]:
    """Named subsets that need no choosing: each family, the attention / MLP groups, each layer."""
    from tdabench.components import GROUPS

    fam = np.array(sim.component_family)
    out = [(f"family {f}", np.flatnonzero(fam == f)) for f in dict.fromkeys(sim.component_family)]
    out += [(f"group {g}", np.flatnonzero(np.isin(fam, sorted(members)))) for g, members in GROUPS.items()]
    out += [
        (f"layer {layer}", np.flatnonzero(sim.component_layer == layer))
        for layer in sorted(set(sim.component_layer.tolist()) - {-1})
    ]
    return [(name, idx) for name, idx in out if len(idx)]


@dataclass(frozen=True)
class GreedyStep:
    step: int  # 1-based
    component: int  # index of the component added at this step
    objective: float  # on the selection queries, of the subset after this step


def greedy_forward(
    sim: Similarity, queries: np.ndarray, objective: str, max_params: float | None = None
) -> list[GreedyStep]:
    """Forward selection run to the end: at each step add the component that maximises `objective`
    of the subset's cosine on `queries`. Vectorised over candidates from running sums:
    O(C^2 x queries x columns) in total. With `max_params`, only components that still fit the
    parameter budget are candidates, and selection stops when none does."""
    targets, ref = sim.targets(queries), _reference(sim, queries, objective)
    dot = sim.dot[:, queries].astype(np.float64)  # [C, Qs, N]
    qsq = sim.query_sqnorm[:, queries].astype(np.float64)  # [C, Qs]
    n_c, n_q, n_cols = dot.shape
    # Training squared norms per scored column: [C, N] (dense) or [C, Qs, b] (candidates).
    tsq = np.stack([sim.train_sqnorm_columns(np.array([c]), queries) for c in range(n_c)])
    chunk = max(1, _MAX_SCORES // max(1, n_q * n_cols))

    run_dot, run_q, run_t = np.zeros((n_q, n_cols)), np.zeros(n_q), np.zeros(tsq.shape[1:])
    remaining = list(range(n_c))
    steps: list[GreedyStep] = []
    used = 0
    while True:
        if max_params is not None:
            remaining = [c for c in remaining if used + sim.component_params[c] <= max_params]
        if not remaining:
            break
        values = np.empty(len(remaining))
        for lo in range(0, len(remaining), chunk):
            cand = np.array(remaining[lo : lo + chunk])
            scores = cosine_from_sums(run_dot + dot[cand], run_q + qsq[cand], run_t + tsq[cand])  # [R, Qs, N]
            values[lo : lo + len(cand)] = objective_values(scores, targets, objective, ref)
        cand = np.array(remaining)
        pos = _pick(values, sim.component_params[cand], cand)
        best = int(cand[pos])
        run_dot += dot[best]
        run_q += qsq[best]
        run_t += tsq[best]
        remaining.remove(best)
        used += int(sim.component_params[best])
        steps.append(GreedyStep(len(steps) + 1, best, float(values[pos])))
    return steps


def best_prefix(steps: list[GreedyStep], sim: Similarity) -> int:
    """Number of greedy steps whose subset scored best on the selection queries (ties: smaller);
    0 for an empty run."""
    if not steps:
        return 0
    values = np.array([s.objective for s in steps])
    params = np.cumsum([sim.component_params[s.component] for s in steps])
    return _pick(values, params, np.arange(len(steps))) + 1


# The selection table (results/selection/{setting}.parquet): one row per scored single component
# (kind single), greedy step (kind greedy) and budgeted greedy step (kind budget), per split;
# `chosen` marks the best single, and the last step of the greedy / budgeted prefix that was kept.
SELECTION_SCHEMA = {
    "split": pl.Int64,
    "kind": pl.Utf8,
    "step": pl.Int64,
    "component": pl.Utf8,
    "params": pl.Int64,
    "params_cum": pl.Int64,
    "objective": pl.Float64,
    "chosen": pl.Boolean,
    "budget": pl.Float64,
    "setting": pl.Utf8,
    "objective_name": pl.Utf8,
}


def _step_rows(sim: Similarity, steps: list[GreedyStep], split: int, kind: str, kept: int, **extra) -> list[dict]:
    """One row per greedy step; `chosen` marks the last step of the kept prefix (`kept` steps)."""
    cum = np.cumsum([sim.component_params[s.component] for s in steps])
    return [
        {
            "split": split,
            "kind": kind,
            **extra,
            "step": s.step,
            "component": sim.components[s.component],
            "params": int(sim.component_params[s.component]),
            "params_cum": int(cum[i]),
            "objective": s.objective,
            "chosen": s.step == kept,
        }
        for i, s in enumerate(steps)
    ]


def selection_rows(sim: Similarity, split: int, sel: np.ndarray, objective: str, budgets: list[float]) -> list[dict]:
    """Rows of one split: every single component's objective, greedy forward selection run to the
    end, and greedy selection within each parameter budget (its best prefix)."""
    params = sim.component_params
    singles = single_component_objectives(sim, sel, objective)
    chosen_single = best_single(sim, sel, objective)
    steps = greedy_forward(sim, sel, objective)
    n_best = best_prefix(steps, sim)
    rows = [
        {
            "split": split,
            "kind": "single",
            "component": sim.components[c],
            "params": int(params[c]),
            "params_cum": int(params[c]),
            "objective": float(singles[c]),
            "chosen": c == chosen_single,
        }
        for c in range(len(sim.components))
    ]
    rows += _step_rows(sim, steps, split, "greedy", n_best)
    total = int(params.sum())
    for budget in budgets:  # greedy among the components that still fit, then its best prefix
        b_steps = greedy_forward(sim, sel, objective, max_params=budget * total)
        rows += _step_rows(sim, b_steps, split, "budget", best_prefix(b_steps, sim), budget=budget)
        if not b_steps:
            log.warning("split %d: no component fits the budget %g of the parameters", split, budget)
    log.info(
        "split %d: best single %s; greedy chose %d steps (%s %.3f on %d selection queries)",
        split,
        sim.components[chosen_single],
        n_best,
        objective,
        steps[n_best - 1].objective,
        len(sel),
    )
    return rows


@dataclass(frozen=True)
class SelectionTable:
    """Reader of the selection table: the component sets each split chose, by name."""

    table: pl.DataFrame

    @classmethod
    def from_rows(cls, rows: list[dict], setting: str, objective: str) -> SelectionTable:
        base = {k: v for k, v in SELECTION_SCHEMA.items() if k not in ("setting", "objective_name")}
        table = pl.DataFrame(rows, schema=base).with_columns(
            pl.lit(setting).alias("setting"), pl.lit(objective).alias("objective_name")
        )
        return cls(table)

    @classmethod
    def read(cls, path: str | Path) -> SelectionTable:
        return cls(read_parquet_checked(path, SELECTION_SCHEMA, "selection table"))

    def write(self, path: str | Path) -> None:
        write_parquet(self.table, path)

    @property
    def splits(self) -> list[int]:
        return sorted(set(self.table["split"].to_list()))

    def _rows(self, split: int, kind: str) -> pl.DataFrame:
        return self.table.filter((pl.col("split") == split) & (pl.col("kind") == kind))

    def best_single(self, split: int) -> list[str]:
        return self._rows(split, "single").filter(pl.col("chosen"))["component"].to_list()

    def greedy_steps(self, split: int) -> pl.DataFrame:
        """The split's greedy run to the end: step, component, params_cum, objective, chosen."""
        return self._rows(split, "greedy").sort("step")

    def greedy_order(self, split: int) -> list[str]:
        return self.greedy_steps(split)["component"].to_list()

    def greedy_chosen_steps(self, split: int) -> int:
        """Length of the greedy prefix kept (best on the selection queries)."""
        return int(self.greedy_steps(split).filter(pl.col("chosen"))["step"][0])

    def greedy_set(self, split: int) -> list[str]:
        return self.greedy_order(split)[: self.greedy_chosen_steps(split)]

    def budget_sets(self, split: int) -> list[tuple[float, list[str]]]:
        """(budget, kept greedy prefix within that budget) per budget, in budget order."""
        out = []
        budgeted = self._rows(split, "budget").sort("budget", "step")
        for (budget,), run in budgeted.group_by("budget", maintain_order=True):
            steps = run.filter(pl.col("chosen"))["step"][0]
            out.append((float(budget), run["component"].to_list()[:steps]))
        return out
