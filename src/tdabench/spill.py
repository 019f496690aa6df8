"""Training examples' gradients kept on disk between the passes of one streamed job.

A dense streamed similarity job makes one pass over its training examples per chunk of held
queries (`tdabench.streaming`). On the host the training examples come back from the model as
factors (a linear layer's inputs and output gradients), a few times smaller than the formed
gradients: for SmolLM2-135M at 57 tokens about 70 MB a sample, against 424 MB formed. `Spill`
writes each group of them to a file during the first pass, and the later passes read the group
back instead of running the model again: the same tensors, so the same numbers, bit for bit.
Reading a group is a sequential read of a file the page cache often still holds; running it
through the model is a forward and backward pass per sample.

The files live in one directory beside the job's output, named after it, written to a temporary
name and then renamed (a killed job leaves no file that looks whole), and removed when the job
ends, however it ends; a rerun of a killed job removes what it left first.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from tdabench.representation import Dense, Factors, Representation

log = logging.getLogger(__name__)

Group = list[tuple[slice, dict[str, Representation]]]  # (rows, {component: representation}) per batch


class Spill:
    """A directory of groups of representations, keyed by the group's place in the pass."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)  # what a killed run left
        self.directory.mkdir(parents=True)
        self.saved: set[int] = set()
        self.bytes = 0

    def path(self, key: int) -> Path:
        return self.directory / f"group-{key:05d}.pt"

    def save(self, key: int, group: Group) -> None:
        """Write a group: factors as they are, formed gradients copied out of any reused buffer
        (a view would save the whole buffer)."""
        batches = []
        for rows, reps in group:
            factors = {n: (r.x, r.g) for n, r in reps.items() if isinstance(r, Factors)}
            formed = {n: r.tensor.clone() for n, r in reps.items() if isinstance(r, Dense)}
            batches.append({"rows": (rows.start, rows.stop), "factors": factors, "formed": formed})
        path, tmp = self.path(key), self.path(key).with_suffix(".tmp")
        torch.save(batches, tmp)
        os.replace(tmp, path)
        self.saved.add(key)
        self.bytes += path.stat().st_size

    def load(self, key: int) -> Group:
        """A saved group, as `save` was given it (tensors mapped from the file)."""
        batches = torch.load(self.path(key), mmap=True, weights_only=True)
        group: Group = []
        for b in batches:
            reps: dict[str, Representation] = {n: Factors(x, g) for n, (x, g) in b["factors"].items()}
            reps.update({n: Dense(t) for n, t in b["formed"].items()})
            group.append((slice(*b["rows"]), reps))
        return group

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
