"""Benchmarks that hold still: every contender runs in the same process, interleaved round by round
(the order rotates each round, so none always follows the same one), after warm-up rounds. Load
on a shared machine then lands on every contender alike; the garbage collector runs between
timings, never inside one (as timeit does); each ratio is taken per round (both
sides measured seconds apart) and reported as a median with its interquartile range.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tdabench.device import release_free_memory


@dataclass
class Contender:
    name: str
    run: Callable[[int], object]  # round index -> one unit of work (e.g. one batch)
    units: Callable[[int], int]  # round index -> samples that unit handles
    note: str = ""


def interleave(
    contenders: Sequence[Contender], rounds: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> dict[str, np.ndarray]:
    """Seconds per round of every contender ({name: [rounds]}), interleaved and rotated."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (timed rounds after the warm-up), not {rounds}")
    for w in range(warmup):
        for c in contenders:
            release_free_memory()
            c.run(w)
    seconds: dict[str, list[float]] = {c.name: [] for c in contenders}
    n = len(contenders)
    for r in range(rounds):
        for c in list(contenders[r % n :]) + list(contenders[: r % n]):
            # as timeit does: no collection (of whatever came before) inside a timing; and the
            # pages the previous contender freed handed back, so that its heap does not count
            # under (or leave no room for) the next one
            release_free_memory()
            gc.disable()
            try:
                sync()
                start = time.perf_counter()
                c.run(r)
                sync()
                seconds[c.name].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return {k: np.array(v) for k, v in seconds.items()}


def rates(contenders: Sequence[Contender], seconds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Samples per second of every contender in every round."""
    return {c.name: np.array([c.units(r) for r in range(len(seconds[c.name]))]) / seconds[c.name] for c in contenders}


def spread(values: np.ndarray) -> tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return float(med), float(q1), float(q3)


def fmt(values: np.ndarray, digits: int = 2) -> str:
    med, q1, q3 = spread(values)
    return f"{med:.{digits}f} [{q1:.{digits}f}-{q3:.{digits}f}]"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


class PeakRss:
    """Highest resident set size while the block runs, sampled every `every` s in a thread
    (peak_rss_mb() is the process's all-time peak: it cannot tell contenders apart)."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak_mb = every, float("nan")
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self.peak_mb = rss_mb()

        def sample():
            while not self._stop.wait(self.every):
                self.peak_mb = max(self.peak_mb, rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
