"""HDF5 gradient store: one dataset per component, rows = samples.

Layout of one file (one shard of one split):
    grads/<component name>   float32|float16 [n_samples, d_c]   row-chunked, uncompressed
    sample_ids               utf-8 string    [n_samples]
    done                     bool            [n_samples]        rows already written
    attrs: format, split, shard, n_shards, model_fingerprint, components (JSON: name, family,
           layer, shape), dtype, loss, config_hash, code_version
A split sharded into several files reads as one logical store (`GradientStore`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from tdabench.components import Component
from tdabench.io import atomic_path

FORMAT = "tdabench-gradients/1"
LOSS = "mean token cross-entropy over the sample's labelled tokens (labels != -100)"
STR = h5py.string_dtype("utf-8")


def _chunk_rows(n: int, dim: int, itemsize: int, target_bytes: int = 1 << 20) -> int:
    return max(1, min(n, target_bytes // max(1, dim * itemsize)))


class GradientStoreWriter:
    """Create a store at a temporary path; rows arrive in batches. Used as a context manager:
    on a clean exit with every row written the file is renamed into place, otherwise removed."""

    def __init__(self, path: str | Path, sample_ids: Sequence[str], components: Sequence[Component],
                 dtype: str = "float32", attrs: dict | None = None):
        self.path, self.sample_ids, self.components = Path(path), list(sample_ids), list(components)
        self.dtype, self.attrs = np.dtype(dtype), dict(attrs or {})

    def __enter__(self) -> "GradientStoreWriter":
        self._ctx = atomic_path(self.path)
        self.file = h5py.File(self._ctx.__enter__(), "w")
        n = len(self.sample_ids)
        self.file.create_dataset("sample_ids", data=np.array(self.sample_ids, dtype=object), dtype=STR)
        self.file.create_dataset("done", data=np.zeros(n, dtype=bool))
        grp = self.file.create_group("grads")
        for c in self.components:
            rows = _chunk_rows(n, c.numel, self.dtype.itemsize)
            grp.create_dataset(c.name, shape=(n, c.numel), dtype=self.dtype,
                               chunks=(rows, c.numel) if n else None)
        meta = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "loss": LOSS,
            "components": json.dumps([
                {"name": c.name, "family": c.family, "layer": c.layer, "shape": list(c.shape)}
                for c in self.components
            ]),
            **self.attrs,
        }
        for key, value in meta.items():
            self.file.attrs[key] = value
        return self

    def write(self, rows: slice, grads: dict[str, np.ndarray]) -> None:
        for c in self.components:
            self.file["grads"][c.name][rows] = np.asarray(grads[c.name], dtype=self.dtype)
        self.file["done"][rows] = True

    def __exit__(self, exc_type, exc, tb) -> None:
        missing = int((~self.file["done"][:]).sum())
        self.file.close()
        if exc is None and missing:
            exc = RuntimeError(f"{self.path}: {missing} rows were never written")
            self._ctx.__exit__(type(exc), exc, None)
            raise exc
        self._ctx.__exit__(exc_type, exc, tb)


class GradientStore:
    """Read-only view of one split's shards, in shard order, as one logical [n, d_c] per component."""

    def __init__(self, paths: str | Path | Sequence[str | Path]):
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("a gradient store needs at least one file")
        self.files = [h5py.File(p, "r") for p in self.paths]
        first = self.files[0].attrs
        for p, f in zip(self.paths, self.files):
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{p}: not a tdabench gradient store (format {f.attrs.get('format')!r})")
            for key in ("components", "model_fingerprint", "dtype"):
                if f.attrs.get(key) != first.get(key):
                    raise ValueError(f"{p}: attribute {key!r} differs from {self.paths[0]}")
            if not f["done"][:].all():
                raise ValueError(f"{p}: incomplete store (not every row is done)")
        self.attrs = dict(first)
        self.component_info = json.loads(first["components"])
        self.components = [c["name"] for c in self.component_info]
        self.sample_ids = [s.decode() if isinstance(s, bytes) else s
                           for f in self.files for s in f["sample_ids"][:]]
        self._sizes = [f["sample_ids"].shape[0] for f in self.files]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def dim(self, component: str) -> int:
        return self.files[0]["grads"][component].shape[1]

    def read(self, component: str, rows: np.ndarray | None = None) -> np.ndarray:
        """[n, d_c] (or [len(rows), d_c]) as float32."""
        full = np.concatenate([f["grads"][component][:] for f in self.files]).astype(np.float32, copy=False)
        return full if rows is None else full[rows]

    def iter_blocks(self, component: str, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, [block, d_c] float32) over all shards, without loading a whole component."""
        offset = 0
        for f, size in zip(self.files, self._sizes):
            ds = f["grads"][component]
            for start in range(0, size, block_rows):
                yield offset + start, ds[start:start + block_rows].astype(np.float32, copy=False)
            offset += size

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
