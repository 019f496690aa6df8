"""Training examples' gradients kept on disk between the passes of one streamed job.

A dense streamed similarity job makes one pass over its training examples per chunk of held
queries (`tdabench.streaming`). On the host the training examples come back from the model as
factors (a linear layer's inputs and output gradients), a few times smaller than the formed
gradients: for SmolLM2-135M at 57 tokens about 70 MB a sample, against 424 MB formed. `Spill`
keeps them on disk, a file per batch and component, so that every pass reads one
component of all the training examples at a time instead of running the model again: the same
tensors, so the same gradients. Reading a component is a read of files the page cache often
still holds; running the examples through the model is a forward and backward pass per sample.

The files live in one directory beside the job's output, named after it, each written to a
temporary name and then renamed (a killed job leaves no file that looks whole), and the directory
is removed when the job ends, however it ends; a rerun of a killed job removes what it left first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tdabench.representation import Dense, Factors, Representation


class Spill:
    """A directory of batches' representations, keyed by the batch's place in the pass: one file
    per batch and component, so that a pass can read one component of every batch at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)  # what a killed run left
        self.directory.mkdir(parents=True)
        self.saved: set[int] = set()
        self.bytes = 0

    def path(self, key: int, name: str) -> Path:
        return self.directory / f"batch-{key:05d}" / f"{name}.pt"

    def save(self, key: int, rows: slice, reps: dict[str, Representation]) -> None:
        """Write a batch's representations, a file per component: factors as they are, formed
        gradients copied out of any reused buffer (a view would save the whole buffer)."""
        (self.directory / f"batch-{key:05d}").mkdir()
        for name, r in reps.items():
            held = ("factors", r.x, r.g) if isinstance(r, Factors) else ("formed", r.tensor.clone())
            path = self.path(key, name)
            tmp = path.with_suffix(".tmp")
            torch.save(((rows.start, rows.stop), held), tmp)
            os.replace(tmp, path)
            self.bytes += path.stat().st_size
        self.saved.add(key)

    def load(self, key: int, name: str) -> tuple[slice, Representation]:
        """One component of a saved batch: (rows, representation), read into memory (a mapped
        file would count in the job's resident memory for as long as it stays mapped)."""
        (start, stop), held = torch.load(self.path(key, name), weights_only=True)
        return slice(start, stop), Factors(held[1], held[2]) if held[0] == "factors" else Dense(held[1])

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.saved.clear()


def spill_directory(out: str | Path) -> Path:
    """Where the job writing `out` keeps its training examples between passes."""
    out = Path(out)
    return out.parent / f".{out.name}.spill"


def fits(directory: Path, need: float) -> tuple[bool, float]:
    """Whether the file system of `directory` has twice `need` bytes free -> (fits, free bytes)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return free >= 2 * need, free
