"""The costs table (results/evaluation/costs.parquet): one row per (setting, method, variant, k,
budget) with the time to represent new samples (tdabench.costs measures it); the evaluation joins
its `seconds_per_sample` onto the results by those keys. Torch-free, so the evaluation reads it
without the gradient code."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tdabench.io import read_parquet_checked, write_parquet

COSTS_SCHEMA = {
    "setting": pl.Utf8,
    "method": pl.Utf8,
    "variant": pl.Utf8,
    "k": pl.Int64,
    "budget": pl.Float64,
    "components": pl.Utf8,
    "n_samples": pl.Int64,
    "extract_seconds": pl.Float64,
    "reduce_seconds": pl.Float64,
    "seconds_per_sample": pl.Float64,
}


def costs_table(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=COSTS_SCHEMA)


def write_costs(table: pl.DataFrame, path: str | Path) -> None:
    write_parquet(table.select(list(COSTS_SCHEMA)), path)


def read_costs(path: str | Path) -> pl.DataFrame:
    return read_parquet_checked(path, COSTS_SCHEMA, "costs table")
