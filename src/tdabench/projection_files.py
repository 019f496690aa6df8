"""Projection files: the reduced gradients of one projection method (or of select-then-project),
every k and seed. Writer and validating reader; nothing else opens these files.

Format (tdabench-projection/1), one HDF5 file:
    attrs      format, method, full_dim (full-gradient methods), kind (select_then_project),
               model_fingerprint
    train_ids  string [T]
    query_ids  string [Q]
    one group per (k, seed[, split]) holding
        train    float32 [T, dim]
        queries  float32 [Q, dim]
        attrs    k, seed, split (-1: the full gradient), components (JSON list of the projected
                 components; empty: all), seconds_per_sample
Group names (`k256/seed0`, `split1/k256/seed0`) are for people browsing the file; the reader uses
the attributes only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tdabench.integrity import open_hdf5, read_checked, sealed_hdf5

FORMAT = "tdabench-projection/1"
STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Projected:
    """Projected gradients of one (method, k, seed[, split]): train [T, dim] and the setting's
    queries [Q, dim], rows aligned with the similarity store's ids."""

    method: str
    k: int
    seed: int
    train: np.ndarray
    queries: np.ndarray
    split: int | None = None  # select_then_project: the split whose greedy set was projected
    components: tuple[str, ...] = ()  # select_then_project: the projected components (full names)


class ProjectionWriter:
    """Write one projection file atomically: `with ProjectionWriter(...) as w: w.add(...)`."""

    def __init__(self, path: str | Path, method: str, train_ids: Sequence[str], query_ids: Sequence[str], **attrs):
        self.path, self.method = Path(path), method
        self.train_ids, self.query_ids, self.attrs = list(train_ids), list(query_ids), attrs

    def __enter__(self) -> ProjectionWriter:
        self._sealed = sealed_hdf5(self.path)
        self.file = self._sealed.__enter__()
        self.file.attrs.update({"format": FORMAT, "method": self.method, **self.attrs})
        self.file.create_dataset("train_ids", data=np.array(self.train_ids, dtype=object), dtype=STR)
        self.file.create_dataset("query_ids", data=np.array(self.query_ids, dtype=object), dtype=STR)
        return self

    def add(
        self,
        k: int,
        seed: int,
        train: np.ndarray,
        queries: np.ndarray,
        seconds_per_sample: float,
        split: int | None = None,
        components: Sequence[str] = (),
    ) -> None:
        """One (k, seed[, split]): train [T, dim], queries [Q, dim] in the file's id order."""
        if train.shape[0] != len(self.train_ids) or queries.shape[0] != len(self.query_ids):
            raise ValueError(
                f"{self.path}: rows {train.shape[0]} / {queries.shape[0]} do not match "
                f"{len(self.train_ids)} train / {len(self.query_ids)} query ids"
            )
        name = f"k{k}/seed{seed}" if split is None else f"split{split}/k{k}/seed{seed}"
        group = self.file.create_group(name)
        group["train"], group["queries"] = train, queries
        group.attrs.update(
            {
                "k": k,
                "seed": seed,
                "split": -1 if split is None else split,
                "components": json.dumps(list(components)),
                "seconds_per_sample": seconds_per_sample,
            }
        )

    def __exit__(self, exc_type, exc, tb) -> None:
        self._sealed.__exit__(exc_type, exc, tb)


def read_projections(path: str | Path, query_ids: Sequence[str]) -> list[Projected]:
    """Every (k, seed[, split]) of a projection file, query rows in the order of `query_ids`."""
    found: list[tuple[str, Projected]] = []
    with open_hdf5(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a tdabench projection file (format {f.attrs.get('format')!r})")
        row_of = {s.decode(): i for i, s in enumerate(read_checked(f, path, "query_ids"))}
        missing = [q for q in query_ids if q not in row_of]
        if missing:
            raise ValueError(f"{path}: {len(missing)} queries missing, e.g. {missing[:3]}")
        rows = [row_of[q] for q in query_ids]
        method = str(f.attrs["method"])

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "train" in obj:
                a = obj.attrs
                split = int(a["split"])
                found.append(
                    (
                        name,
                        Projected(
                            method,
                            int(a["k"]),
                            int(a["seed"]),
                            read_checked(f, path, f"{name}/train"),
                            read_checked(f, path, f"{name}/queries")[rows],
                            split=None if split < 0 else split,
                            components=tuple(json.loads(a["components"])),
                        ),
                    )
                )

        f.visititems(visit)
    return [p for _, p in sorted(found, key=lambda item: item[0])]  # name order: stable across writers
