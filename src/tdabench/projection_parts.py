"""Each component's block of a projection of the full gradient, kept so that select-then-project of
any set of components is a sum: no second pass through the model once the selections are known.

A projection of the concatenated gradient splits over components, P g = sum_c P_c g_c, and each
block P_c is drawn from the seed and the component's index among all of them (tdabench.projection),
so the projection of a selected set S, P_S g_S, is sum over c in S of P_c g_c. `project_selected`
adds the stored blocks of S in component order into float32 zeros, as the streamed pass adds them
(`tdabench.projection_stream`), so its numbers are the pass's bit for bit. Block-wise kinds do not
split this way (their block sizes depend on the set), so only a plain kind (sjlt, gaussian,
rademacher: `projection.select_kind`) is kept.

Format (tdabench-projection-parts/1), one HDF5 file:
    attrs      format, kind, nonzeros, components (JSON: every component, in extraction order),
               component_dims (JSON), model_fingerprint
    train_ids, query_ids  string [T], [Q]
    k{k}/seed{seed}/blocks   float32 [C, T + Q, k]: component c's block, training rows then queries
    k{k}/seed{seed}/seconds  float64 [C]: time spent projecting each component's rows
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from tdabench.integrity import CorruptFileError, open_hdf5, read_checked, sealed_hdf5

FORMAT = "tdabench-projection-parts/1"
STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20  # of a stored chunk: rows of one component, all k columns


class PartsWriter:
    """Write a parts file atomically: `with PartsWriter(...) as w: w.add(k, seed, c, first, y, s)`."""

    def __init__(
        self,
        path: str | Path,
        kind: str,
        nonzeros: int,
        components: Sequence[str],
        component_dims: Sequence[int],
        keys: Sequence[tuple[int, int]],
        train_ids: Sequence[str],
        query_ids: Sequence[str],
        **attrs,
    ):
        self.path, self.components, self.keys = Path(path), list(components), list(keys)
        self.n = len(train_ids) + len(query_ids)
        self.ids = (list(train_ids), list(query_ids))
        self.attrs = {
            "kind": kind,
            "nonzeros": nonzeros,
            "components": json.dumps(self.components),
            "component_dims": json.dumps([int(d) for d in component_dims]),
            **attrs,
        }

    def __enter__(self) -> PartsWriter:
        # a chunk cache (per dataset) that holds one write's chunks: a group's rows seldom end on a
        # chunk's edge, and an edge chunk is then read back once when the next group fills it
        self._sealed = sealed_hdf5(self.path, rdcc_nbytes=8 << 20)
        self.file = self._sealed.__enter__()
        self.file.attrs.update({"format": FORMAT, **self.attrs})
        for name, ids in zip(("train_ids", "query_ids"), self.ids):
            self.file.create_dataset(name, data=np.array(ids, dtype=object), dtype=STR)
        self.blocks, self.seconds = {}, {}
        for k, seed in self.keys:
            rows = max(1, min(self.n, CHUNK_BYTES // (4 * k)))
            group = self.file.create_group(f"k{k}/seed{seed}")
            self.blocks[k, seed] = group.create_dataset(
                "blocks", shape=(len(self.components), self.n, k), dtype=np.float32, chunks=(1, rows, k)
            )
            self.seconds[k, seed] = np.zeros(len(self.components))
        return self

    def add(self, k: int, seed: int, component: int, first: int, block: np.ndarray, seconds: float) -> None:
        """Component `component`'s block [rows, k] of rows first.. (training rows, then queries)."""
        self.blocks[k, seed][component, first : first + block.shape[0]] = block
        self.seconds[k, seed][component] += seconds

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            for (k, seed), seconds in self.seconds.items():
                self.file[f"k{k}/seed{seed}"]["seconds"] = seconds
        self._sealed.__exit__(exc_type, exc, tb)


class Parts:
    """A parts file, read: its attributes checked against what the reader needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open_hdf5(self.path)
        if self.file.attrs.get("format") != FORMAT:
            raise CorruptFileError(f"{self.path}: not a {FORMAT} file (format {self.file.attrs.get('format')!r})")
        self.kind, self.nonzeros = str(self.file.attrs["kind"]), int(self.file.attrs["nonzeros"])
        self.components = json.loads(self.file.attrs["components"])
        self.component_dims = json.loads(self.file.attrs["component_dims"])
        self.train_ids = [s.decode() if isinstance(s, bytes) else s for s in self.file["train_ids"][()]]
        self.query_ids = [s.decode() if isinstance(s, bytes) else s for s in self.file["query_ids"][()]]

    def __enter__(self) -> Parts:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def check(self, kind: str, nonzeros: int, keys: Sequence[tuple[int, int]]) -> None:
        """Refuse a file made for another projection (a stale file: rerun the job that wrote it)."""
        missing = [f"k{k}/seed{s}" for k, s in keys if f"k{k}/seed{s}" not in self.file]
        if (self.kind, self.nonzeros) != (kind, nonzeros) or missing:
            raise CorruptFileError(
                f"{self.path}: holds kind {self.kind!r}, nonzeros {self.nonzeros}; needed kind {kind!r}, "
                f"nonzeros {nonzeros}{f', and it lacks {missing}' if missing else ''}: rerun the job that "
                "writes it (similarity_projection_stream or projection_stream)"
            )

    def blocks(self, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(every component's block [C, T + Q, k], seconds [C]), checked as read."""
        name = f"k{k}/seed{seed}"
        return read_checked(self.file, self.path, f"{name}/blocks"), read_checked(
            self.file, self.path, f"{name}/seconds"
        )


def positions(components: Sequence[str], chosen: Sequence[str]) -> list[int]:
    """Where the `chosen` components are among the file's `components`, in component order."""
    want = set(chosen)
    unknown = want - set(components)
    if unknown:
        raise KeyError(f"components not in the parts file: {sorted(unknown)[:5]}")
    return [c for c, name in enumerate(components) if name in want]


def select_sum(blocks: np.ndarray, at: Sequence[int]) -> np.ndarray:
    """The projection of the components at positions `at` (in component order, `positions`):
    their blocks [C, n, k] summed into float32 zeros -> [n, k] (the streamed pass's sum, bit for
    bit)."""
    out = np.zeros(blocks.shape[1:], dtype=np.float32)
    for c in at:
        out += blocks[c]
    return out
