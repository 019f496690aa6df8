"""Progress of long loops: a tqdm bar, plus a console line every ~10 s inside a job.

A job sends stderr (so the tqdm bar) to its log file; the console would then show nothing for
minutes. Whenever stderr is redirected like that, `Progress` also prints one line to the real
stderr every `every` seconds: done/total, rate and ETA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm


class Progress:
    """`for x in Progress(items, total, desc)` or `bar = Progress(total=n, desc=...); bar.update(1)`."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        every: float = 10.0,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.bar = tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, mininterval=2.0)
        self.iterable, self.total, self.desc, self.unit, self.every = iterable, total, desc, unit, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        redirected = sys.stderr is not sys.__stderr__ and sys.__stderr__ is not None
        self.console = sys.__stderr__ if redirected and not disable else None

    def __iter__(self) -> Iterator:
        for item in self.bar:
            yield item
            self._tick(1)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self._tick(n)

    def set_total(self, total: int) -> None:
        """For a bar whose length is known only once the work is planned."""
        self.total = self.bar.total = total
        self.bar.refresh()

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        """`desc: done/total unit (rate/s, ETA s)`."""
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        total = f"/{self.total}" if self.total else ""
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if self.total and rate > 0 else ""
        return f"[tdabench] {self.desc}: {self.done}{total} {self.unit} ({rate:.2f}/s{eta})"

    def _tick(self, n: int) -> None:
        self.done += n
        if self.console is None:
            return
        now = time.perf_counter()
        if now - self.last >= self.every and (self.total is None or self.done < self.total):
            self.last = now
            print(self.line(), file=self.console, flush=True)
