"""`tdabench verify`: check every store and table of a results folder, list what cannot be trusted
and the command that rebuilds it.

A results folder with a manifest (results/manifest.json, written by the summary job) is checked
against it first: every file listed must be there with the bytes its job wrote. Then HDF5 stores
(gradients, similarity, projections) are checked against the checksums stored when they were
written, for finite values and for their own format's invariants; parquet tables are read in
full (their pages carry checksums) and checked for the columns their owner requires.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from tdabench.integrity import rebuild_hint, verify_hdf5
from tdabench.manifest import NAME, check_manifest

# Parquet tables by file name: the columns their owner module requires.
_TABLES = {
    "train.parquet": ("tdabench.data.sources", "TRAIN_COLUMNS"),
    "background.parquet": ("tdabench.data.sources", "TRAIN_COLUMNS"),
    "queries.parquet": ("tdabench.data.sources", "QUERY_COLUMNS"),
    "queries_all.parquet": ("tdabench.data.sources", "QUERY_COLUMNS"),
    "metrics.parquet": ("tdabench.evaluate", "RESULTS_REQUIRED"),
    "candidates.parquet": ("tdabench.evaluate", "RESULTS_REQUIRED"),
    "in_sample.parquet": ("tdabench.evaluate", "RESULTS_REQUIRED"),
    "costs.parquet": ("tdabench.costs_table", "COSTS_SCHEMA"),
    "bm25_candidates.parquet": ("tdabench.candidates", "CANDIDATES_SCHEMA"),
}


def _required(path: Path) -> tuple[str, ...]:
    import importlib

    if path.parent.name == "selection":
        from tdabench.selection import SELECTION_SCHEMA

        return tuple(SELECTION_SCHEMA)
    if path.name not in _TABLES:
        return ()
    module, name = _TABLES[path.name]
    return tuple(getattr(importlib.import_module(module), name))


def check_file(path: Path) -> list[str]:
    """Problems of one file ([] when sound)."""
    if path.suffix == ".h5":
        problems = verify_hdf5(path)
        if problems:
            return problems
        if path.parent.parent.name == "gradients" or path.parent.name == "gradients":
            from tdabench.store import GradientStore

            try:
                GradientStore(path).close()
            except ValueError as e:
                return [str(e)]
        if path.parent.name == "similarity":
            from tdabench.similarity import load_similarity

            try:
                load_similarity(path)
            except ValueError as e:
                return [str(e)]
        return []
    if path.suffix == ".parquet":
        try:
            table = pl.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any read error means the table cannot be trusted
            return [f"{path}: unreadable parquet ({e})"]
        missing = [c for c in _required(path) if c not in table.columns]
        if missing:
            return [f"{path}: missing columns {missing}"]
        if path.name == "bm25_candidates.parquet":
            from tdabench.candidates import check_candidates

            return [f"{path}: {msg}" for msg in check_candidates(table)]
        return []
    return []


def verify(paths: Iterable[str | Path]) -> tuple[int, list[str]]:
    """(files checked, problems) for the given files and folders (folders: recursively)."""
    files: list[Path] = []
    problems: list[str] = []
    configfiles = None  # the study's, from its manifest: rebuild commands name them
    changed: dict[Path, str] = {}  # files whose bytes differ from the manifest's: the manifest's line
    for p in map(Path, paths):
        if p.is_dir() and (p / NAME).exists():  # a results folder: complete, and as its jobs wrote it
            _, found = check_manifest(p)
            problems += [msg for path, msg in found if not path.exists()]
            changed |= {path.resolve(): msg for path, msg in found if path.exists()}
            configfiles = json.loads((p / NAME).read_text()).get("configfiles")
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".h5", ".parquet") and not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    for f in files:
        found = [f"{msg}; {rebuild_hint(f, configfiles)}" for msg in check_file(f)]
        # a file's own check names the damage more precisely than "its bytes changed"
        problems += found or ([changed.pop(f.resolve())] if f.resolve() in changed else [])
        changed.pop(f.resolve(), None)
    return len(files), problems + list(changed.values())
