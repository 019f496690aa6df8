"""Atomic file output: write to a temporary sibling, rename into place only when complete.

A crashed or interrupted job therefore never leaves a file that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_file():
        fsync(tmp)  # the data is on disk before the name says the file is complete
    _remove(path)
    os.replace(tmp, path)
    fsync(path.parent)


def fsync(path: str | Path) -> None:
    """Flush a file's (or a directory's) data to the disk, so a rename never exposes a file that a
    crash would truncate."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_parquet(df, path: str | Path) -> None:
    """Atomic, and read back before the rename: a table that does not come back whole never lands."""
    import polars as pl

    with atomic_path(path) as tmp:
        try:
            df.write_parquet(tmp)
            back = pl.read_parquet(tmp)
        except Exception as e:  # noqa: BLE001 - polars reports I/O errors as its own types
            raise OSError(f"{path}: writing the table failed ({e})") from e
        if back.shape != df.shape:
            raise OSError(f"{path}: the written table reads back as {back.shape}, not {df.shape}")


def read_parquet(path: str | Path):
    """A parquet table; an unreadable one is an error naming it and the command that rebuilds it."""
    import polars as pl

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - corrupt pages, truncation: name the file
        raise ValueError(
            f"{path}: unreadable parquet table ({e}); rebuild it with: snakemake --cores all --force {path}"
        ) from None


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(obj, path: str | Path) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def read_parquet_checked(path: str | Path, required, what: str):
    """A parquet table that must have the `required` columns (else a clear error naming the file)."""
    table = read_parquet(path)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a tdabench {what} (missing columns {missing})")
    return table
