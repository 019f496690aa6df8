"""HDF5 gradient store: one dataset per component, rows = samples.

Layout of one file (one shard of one split):
    grads/<component name>   float32|float16 [n_samples, d_stored]   row-chunked, uncompressed
    sample_ids               utf-8 string    [n_samples]
    done                     bool            [n_samples]             rows already written
    attrs: format, split, shard, n_shards, model_fingerprint, components (JSON: name, family,
           layer, shape, stored_dim, sketch), dtype, loss, config_hash, code_version
`stored_dim` is the parameter count, or the count-sketch size for a component larger than the
`max_component_dim` cap (then `sketch` holds {kind, k, seed, key}; inner products stay unbiased).
A split sharded into several files reads as one logical store (`GradientStore`).

Writing is resumable: rows land in a `.<name>.partial` file whose chunks are all allocated when it
is created, each batch is flushed with its `done` flags, and the file is renamed into place only
when every row is done. An interrupted job leaves the partial file; the next run with the same
attributes continues from its `done` mask (after checking that the done rows are finite) and ends
with a file identical to an uninterrupted run's.

Writes cannot lie: rows are checked finite before they are written (a NaN names its sample and
component), the file has no chunk cache (a failed write raises at once, never later in a
destructor), every write error names the file, and before the rename the finished file is read
back, its checksums stored and the data fsynced (tdabench.integrity).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from tdabench.components import Component
from tdabench.errors import StudyError
from tdabench.integrity import CorruptFileError, RunningCheck, open_hdf5, rebuild_hint, seal_hdf5
from tdabench.io import fsync

FORMAT = "tdabench-gradients/1"
LOSS = "mean token cross-entropy over the sample's labelled tokens (labels != -100)"
STR = h5py.string_dtype("utf-8")
ID_BYTES = 64  # rough per-row allowance for ids and the done flag in size estimates
log = logging.getLogger(__name__)


class StoreWriteError(StudyError, OSError):
    """Writing a gradient store failed (disk full, quota, I/O error); names the file and cause."""


class NonFiniteGradientError(StudyError, ValueError):
    """A per-sample gradient holds NaN or inf; names the samples and the component."""


def _chunk_rows(n: int, dim: int, itemsize: int, target_bytes: int = 1 << 20) -> int:
    return max(1, min(max(n, 1), target_bytes // max(1, dim * itemsize)))


def estimate_bytes(n_samples: int, stored_dims: Sequence[int], dtype: str = "float32") -> int:
    """Size of a store before it is written (all chunks are allocated up front)."""
    return n_samples * (sum(stored_dims) * np.dtype(dtype).itemsize + ID_BYTES)


def components_json(components: Sequence[Component], sketches: dict[str, dict] | None = None) -> str:
    sketches = sketches or {}
    return json.dumps(
        [
            {
                "name": c.name,
                "family": c.family,
                "layer": c.layer,
                "shape": list(c.shape),
                "stored_dim": sketches[c.name]["k"] if c.name in sketches else c.numel,
                "sketch": sketches.get(c.name),
            }
            for c in components
        ]
    )


def _create_rows(group: h5py.Group, name: str, n: int, dim: int, dtype: np.dtype) -> None:
    """[n, dim] dataset, row-chunked, every chunk allocated now (fixed layout, crash-safe writes)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((_chunk_rows(n, dim, dtype.itemsize), dim))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    space = h5py.h5s.create_simple((n, dim))
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl).close()


class GradientStoreWriter:
    """Write a store batch by batch (context manager). On a clean exit with every row done the
    file is renamed into place; after an error the partial file stays behind for `resume`."""

    def __init__(
        self,
        path: str | Path,
        sample_ids: Sequence[str],
        components: Sequence[Component],
        dtype: str = "float32",
        attrs: dict | None = None,
        sketches: dict[str, dict] | None = None,
        resume: bool = True,
    ):
        self.path, self.sample_ids, self.components = Path(path), list(sample_ids), list(components)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.dtype = np.dtype(dtype)
        self.sketches = dict(sketches or {})
        self.meta = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "loss": LOSS,
            "components": components_json(self.components, self.sketches),
            **(attrs or {}),
        }
        self.resume = resume
        self.done = np.zeros(len(self.sample_ids), dtype=bool)

    def stored_dim(self, c: Component) -> int:
        return self.sketches[c.name]["k"] if c.name in self.sketches else c.numel

    def _matches(self, f: h5py.File) -> bool:
        same_attrs = all(_plain(f.attrs.get(k)) == _plain(v) for k, v in self.meta.items())
        ids = [s.decode() if isinstance(s, bytes) else s for s in f["sample_ids"][:]] if "sample_ids" in f else None
        return same_attrs and ids == self.sample_ids and "done" in f

    def __enter__(self) -> GradientStoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume and self.partial.exists():
            try:
                f = h5py.File(self.partial, "r+", rdcc_nbytes=0)
                if self._matches(f) and self._done_rows_finite(f):
                    self.file, self.done = f, f["done"][:]
                    log.info("resuming %s: %d of %d rows already done", self.partial, self.done.sum(), len(self.done))
                    return self
                f.close()
                log.info("ignoring %s: written with other settings, or holding non-finite rows", self.partial)
            except (OSError, RuntimeError) as e:  # unreadable (killed before its first flush): start over
                log.info("ignoring unreadable %s (%s)", self.partial, e)
        self.partial.unlink(missing_ok=True)
        try:
            self._create()
        except (OSError, RuntimeError) as e:
            self._abandon()
            raise StoreWriteError(f"{self.partial}: creating the gradient store failed ({e})") from e
        return self

    def _create(self) -> None:
        # No chunk cache: every write reaches the file at once, so a failing write (disk full)
        # raises here instead of in a destructor after the rows were counted as done.
        self.file = h5py.File(self.partial, "w", rdcc_nbytes=0)
        n = len(self.sample_ids)
        self.file.create_dataset(
            "sample_ids", data=np.array(self.sample_ids, dtype=object), dtype=STR, track_times=False
        )
        self.file.create_dataset("done", data=self.done, track_times=False)
        grp = self.file.create_group("grads")
        for c in self.components:
            _create_rows(grp, c.name, n, self.stored_dim(c), self.dtype)
        for key, value in self.meta.items():
            self.file.attrs[key] = value
        self.file.flush()

    def _done_rows_finite(self, f: h5py.File) -> bool:
        done = np.flatnonzero(f["done"][:])
        if not len(done):
            return True
        return all(
            np.isfinite(f["grads"][c.name][done[0] : done[-1] + 1][done - done[0]]).all() for c in self.components
        )

    def _abandon(self) -> None:
        """Close after a failure; errors of the close itself are the failure's echo, not news."""
        try:
            if getattr(self, "file", None) is not None:
                self.file.close()
        except (OSError, RuntimeError) as e:
            log.warning("closing %s after an error: %s", self.partial, e)

    def write(self, rows: slice, grads: dict[str, np.ndarray]) -> None:
        """Rows first, then their done flags, then flush: a crash never marks unwritten rows done."""
        arrays = {}
        for c in self.components:
            with np.errstate(over="ignore"):  # float16 overflow becomes inf, refused just below
                a = np.asarray(grads[c.name], dtype=self.dtype)
            if a.shape != (rows.stop - rows.start, self.stored_dim(c)):
                raise ValueError(
                    f"{self.partial}: {c.name} rows have shape {a.shape}, expected "
                    f"{(rows.stop - rows.start, self.stored_dim(c))}"
                )
            bad = ~np.isfinite(a).all(axis=1)
            if bad.any():
                ids = [self.sample_ids[rows.start + i] for i in np.flatnonzero(bad)]
                raise NonFiniteGradientError(
                    f"non-finite per-sample gradient of component {c.name} for sample(s) {ids[:10]}"
                    + (f" (stored as {self.dtype.name}: the values overflow it)" if self.dtype.itemsize < 4 else "")
                )
            arrays[c.name] = a
        try:
            for name, a in arrays.items():
                self.file["grads"][name][rows] = a
            self.file.flush()
            self.file["done"][rows] = True
            self.file.flush()
        except (OSError, RuntimeError) as e:
            raise StoreWriteError(f"{self.partial}: writing rows {rows.start}-{rows.stop - 1} failed ({e})") from e
        self.done[rows] = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._abandon()
            return  # keep the partial file: a rerun resumes from its done mask
        try:
            self.file.close()
        except (OSError, RuntimeError) as e:
            raise StoreWriteError(f"{self.partial}: closing the gradient store failed ({e})") from e
        if not self.done.all():
            raise RuntimeError(f"{self.path}: {int((~self.done).sum())} rows were never written")
        seal_hdf5(self.partial)  # read back: finite, checksums stored, fsynced
        os.replace(self.partial, self.path)
        fsync(self.path.parent)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


class GradientStore:
    """Read-only view of one split's shards, in shard order, as one logical [n, d_c] per component."""

    def __init__(self, paths: str | Path | Sequence[str | Path]):
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("a gradient store needs at least one file")
        self.files = [open_hdf5(p) for p in self.paths]
        first = self.files[0].attrs
        for p, f in zip(self.paths, self.files):
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{p}: not a tdabench gradient store (format {f.attrs.get('format')!r})")
            for key in ("components", "model_fingerprint", "dtype"):
                if f.attrs.get(key) != first.get(key):
                    raise ValueError(f"{p}: attribute {key!r} differs from {self.paths[0]}")
            if not f["done"][:].all():
                raise CorruptFileError(f"{p}: incomplete store (not every row is done); {rebuild_hint(p)}")
        self.attrs = dict(first)
        self.component_info = json.loads(first["components"])
        self.components = [c["name"] for c in self.component_info]
        self.sample_ids = [s.decode() if isinstance(s, bytes) else s for f in self.files for s in f["sample_ids"][:]]
        self._sizes = [f["sample_ids"].shape[0] for f in self.files]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def dim(self, component: str) -> int:
        return self.files[0]["grads"][component].shape[1]

    def read(self, component: str, rows: np.ndarray | None = None) -> np.ndarray:
        """[n, d_c] (or [len(rows), d_c]) as float32; whole reads are checked against the checksums."""
        parts = []
        for p, f in zip(self.paths, self.files):
            block = f["grads"][component][:]
            check = RunningCheck(p, f, f"grads/{component}")
            check.feed(block)
            check.finish()
            parts.append(block)
        full = np.concatenate(parts).astype(np.float32, copy=False)
        return full if rows is None else full[rows]

    def iter_blocks(self, component: str, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, [block, d_c] float32) over all shards, without loading a whole component."""
        offset = 0
        for p, f, size in zip(self.paths, self.files, self._sizes):
            ds = f["grads"][component]
            check = RunningCheck(p, f, f"grads/{component}")  # the whole dataset passes through here
            for start in range(0, size, block_rows):
                block = ds[start : start + block_rows]
                check.feed(block)
                yield offset + start, block.astype(np.float32, copy=False)
            check.finish()
            offset += size

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
