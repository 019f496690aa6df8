"""What every stage job shares: the job description, logging to the rule's log file, threads,
and the MLflow child run."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tdabench import tracking

log = logging.getLogger("tdabench")


@dataclass
class JobContext:
    """A job as Snakemake describes it, as plain Python values (named inputs/outputs only)."""
    rule: str
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    wildcards: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    log: str | None = None

    @classmethod
    def from_snakemake(cls, smk) -> "JobContext":
        return cls(
            rule=smk.rule,
            input=dict(smk.input.items()),
            output=dict(smk.output.items()),
            params=dict(smk.params.items()),
            wildcards=dict(smk.wildcards.items()),
            threads=int(smk.threads),
            log=str(smk.log[0]) if len(smk.log) else None,
        )


@contextlib.contextmanager
def _log_to(path: str | None):
    """Send logging and stderr (progress bars) to the rule's log file, if it has one."""
    if path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        yield
        return
    with open(path, "a", buffering=1) as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stderr(fh):
                yield
        except BaseException:
            log.exception("job failed")
            raise
        finally:
            root.removeHandler(handler)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def run(stage: Callable[[JobContext, tracking.Run], None], job: JobContext) -> None:
    """Run one stage job: logging, MLflow child run (params = the rule's params), wall time."""
    with _log_to(job.log):
        log.info("rule %s wildcards %s threads %d", job.rule, job.wildcards, job.threads)
        start = time.perf_counter()
        with tracking.job_run(job.rule, job.params, job.wildcards) as mlrun:
            stage(job, mlrun)
            seconds = time.perf_counter() - start
            mlrun.log_metrics({"job_seconds": seconds})
        log.info("done in %.1f s", seconds)
        print(f"[tdabench] {job.rule} {job.wildcards or ''} done in {seconds:.1f} s", file=sys.__stderr__)
