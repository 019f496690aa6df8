"""File integrity: checksums stored inside HDF5 files, their verification, and the errors that
name a bad file together with the command that rebuilds it.

Every HDF5 file tdabench writes (gradient, similarity and projection stores) gets, just before
its rename into place, a CRC-32 of every dataset's bytes in the root attribute `checksums`
(JSON {dataset path: hex}) after a read-back that also refuses non-finite floats. `verify_hdf5`
recomputes them; a flipped byte, a truncated file or a row of zeros written over good data shows.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from tdabench.errors import StudyError
from tdabench.io import atomic_path, fsync

CHECKSUMS = "checksums"
BLOCK_BYTES = 64 << 20  # read datasets in blocks of about this size


class CorruptFileError(StudyError, ValueError):
    """A file that cannot be trusted: unreadable, truncated, non-finite or failing its checksum."""


ENV_CONFIGFILES = "TDABENCH_CONFIGFILES"  # JSON list: the invocation's --configfile paths (the Snakefile sets it)


def study_configfiles() -> list[str]:
    return json.loads(os.environ.get(ENV_CONFIGFILES, "[]"))


def rebuild_hint(path: str | Path, configfiles: list[str] | None = None) -> str:
    """The command that rebuilds `path`, with the study's config files (default: this
    invocation's), so it rebuilds the same study and not the default one."""
    if configfiles is None:
        configfiles = study_configfiles()
    config = f" --configfile {' '.join(configfiles)}" if configfiles else ""
    return f"rebuild it with: snakemake --cores all{config} --force {path}"


def _blocks(ds: h5py.Dataset):
    if ds.shape == () or ds.ndim == 0:
        yield np.asarray(ds[()])
        return
    row_bytes = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, ds.shape[0], step):
        yield ds[start : start + step]


def crc32(block: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of an array's bytes in row order (strings: their text), continuing from `crc`."""
    if block.dtype.kind == "O":
        text = "\x00".join(v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(block))
        return zlib.crc32(text.encode(), crc)
    return zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B"), crc)


def stored_checksums(f: h5py.File) -> dict[str, str]:
    raw = f.attrs.get(CHECKSUMS)
    return json.loads(raw) if raw is not None else {}


class RunningCheck:
    """Checksum and finiteness of one dataset, fed block by block in row order by a reader that
    reads it whole anyway; `finish()` raises if the blocks were not what was written."""

    def __init__(self, path, f: h5py.File, dataset: str):
        self.path, self.dataset = path, dataset
        self.expected = stored_checksums(f).get(dataset)
        self.crc = 0

    def feed(self, block: np.ndarray) -> None:
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise CorruptFileError(f"{self.path}: non-finite values in {self.dataset}; {rebuild_hint(self.path)}")
        if self.expected is not None:
            self.crc = crc32(block, self.crc)

    def finish(self) -> None:
        if self.expected is not None and f"{self.crc:08x}" != self.expected:
            raise CorruptFileError(
                f"{self.path}: dataset {self.dataset} does not match its checksum (corrupted on disk); "
                f"{rebuild_hint(self.path)}"
            )


def read_checked(f: h5py.File, path: str | Path, name: str) -> np.ndarray:
    """A whole dataset, checked for finite floats and against its stored checksum (when the file
    has checksums: files of other code need not): one read, no second pass."""
    data = f[name][()]
    check = RunningCheck(path, f, name)
    check.feed(np.asarray(data))
    check.finish()
    return data


def _scan(f: h5py.File) -> tuple[dict[str, str], list[str]]:
    """({dataset: crc32 hex}, [datasets holding non-finite floats])."""
    sums, nonfinite = {}, []

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        crc, finite = 0, True
        for block in _blocks(obj):
            if block.dtype.kind == "f":
                finite &= bool(np.isfinite(block).all())
            crc = crc32(block, crc)
        sums[name] = f"{crc:08x}"
        if not finite:
            nonfinite.append(name)

    f.visititems(visit)
    return sums, nonfinite


def seal_hdf5(path: str | Path) -> None:
    """Read the just-written file back, refuse non-finite floats, store the checksums of every
    dataset and fsync. Raises CorruptFileError naming the file and dataset."""
    try:
        with h5py.File(path, "r+") as f:
            sums, nonfinite = _scan(f)
            if nonfinite:
                raise CorruptFileError(f"{path}: non-finite values in dataset(s) {', '.join(nonfinite)}")
            f.attrs[CHECKSUMS] = json.dumps(sums, sort_keys=True)
    except (OSError, RuntimeError) as e:
        raise CorruptFileError(f"{path}: could not be read back after writing ({e})") from e
    fsync(path)


@contextmanager
def sealed_hdf5(path: str | Path, **options) -> Iterator[h5py.File]:
    """A new HDF5 file (h5py `options`) written at a temporary sibling of `path`: when the block
    ends without an error it is closed, sealed (`seal_hdf5`) and renamed into place; otherwise,
    or when sealing refuses it, removed."""
    with atomic_path(path) as tmp:
        f = h5py.File(tmp, "w", **options)
        try:
            yield f
        finally:
            f.close()
        seal_hdf5(tmp)  # read back: finite, checksums stored, fsynced


def verify_hdf5(path: str | Path) -> list[str]:
    """Problems of one sealed HDF5 file ([] when it is sound)."""
    try:
        with h5py.File(path, "r") as f:
            stored = f.attrs.get(CHECKSUMS)
            sums, nonfinite = _scan(f)
    except (OSError, RuntimeError, KeyError) as e:
        return [f"{path}: unreadable or truncated ({e})"]
    problems = [f"{path}: non-finite values in {name}" for name in nonfinite]
    if stored is None:
        return problems + [f"{path}: no checksums (written by other code or an older tdabench)"]
    stored = json.loads(stored)
    for name in sorted(set(stored) | set(sums)):
        if stored.get(name) != sums.get(name):
            problems.append(f"{path}: dataset {name} does not match its checksum")
    return problems


def open_hdf5(path: str | Path) -> h5py.File:
    """Open for reading; an unreadable file is a CorruptFileError naming it and its fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError) as e:
        raise CorruptFileError(f"{path}: unreadable or truncated HDF5 file ({e}); {rebuild_hint(path)}") from e
