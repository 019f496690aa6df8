"""What every stage job shares: the job description, its typed params, logging to the rule's log
file, threads, its tracking record (its MLflow run, logged when the study ends), the record of its
outputs (the results manifest), and one console line for an error the user fixes."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tdabench import numerics, tracking
from tdabench.contracts import CONTRACTS, typed
from tdabench.errors import StudyError
from tdabench.io import write_json
from tdabench.manifest import record_outputs

log = logging.getLogger("tdabench")
T = TypeVar("T")


def code_digest() -> str:
    """Digest of every source file the study's stages run (tdabench.codedeps.study_digest)."""
    from tdabench.codedeps import study_digest

    return study_digest(sorted({c.module for c in CONTRACTS.values()}))


@dataclass
class JobContext:
    """A job as Snakemake describes it, as plain Python values (named inputs/outputs only).
    `numerics` (every rule's param of that name) is the job runner's, not the stage's: it is
    applied before the stage runs (tdabench.numerics) and left out of `params`."""

    rule: str
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    wildcards: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    log: str | None = None
    numerics: str = "native"

    @classmethod
    def from_snakemake(cls, smk) -> JobContext:
        params = dict(smk.params.items())
        return cls(
            rule=smk.rule,
            input=dict(smk.input.items()),
            output=dict(smk.output.items()),
            params={k: v for k, v in params.items() if k != "numerics"},
            wildcards=dict(smk.wildcards.items()),
            threads=int(smk.threads),
            log=str(smk.log[0]) if len(smk.log) else None,
            numerics=params["numerics"],
        )

    @property
    def name(self) -> str:
        """rule plus wildcard values, e.g. 'gradients-train-0' (names its environment record)."""
        return tracking.job_name(self.rule, self.wildcards)

    def settings_digest(self) -> str:
        """Digest of the rule's params and the numerics mode: everything the config decides about
        the job's numbers (a partial file resumes, and parts merge, only under the same digest)."""
        blob = json.dumps({**self.params, "numerics": self.numerics}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def typed_params(self, cls: type[T]) -> T:
        """The rule's params as the stage's typed Params dataclass (refuses missing/unknown keys)."""
        return typed(cls, self.params, f"rule {self.rule} params")


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
    """A model stage's torch setup: the job's thread count, and the numerics mode's checks (the
    pinned kernels took hold) and CUDA settings."""
    import torch

    numerics.configure_torch(numerics.mode())
    torch.set_num_threads(max(1, n))


ENVIRONMENT_DIR = "logs/environment"  # one JSON record per job (tdabench.numerics.environment)


def record_environment(job: JobContext, mlrun: tracking.Run) -> dict | None:
    """What a job that ran torch computed with (CPU, kernel level, pins, threads, versions, GPU):
    tagged on the job's MLflow run and, for a workflow job (one with a log file), written to
    logs/environment/<job>.json, where the summary collects it into results/provenance.json.
    None for jobs without torch."""
    if "torch" not in sys.modules:
        return None
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else None
    record = {
        "job": job.name,
        "rule": job.rule,
        "wildcards": job.wildcards,
        "outputs": sorted(str(v) for v in job.output.values()),
        "host": os.uname().nodename,
        **numerics.environment(device),
    }
    if job.log is not None:
        Path(ENVIRONMENT_DIR).mkdir(parents=True, exist_ok=True)
        write_json(record, Path(ENVIRONMENT_DIR) / f"{job.name}.json")
    mlrun.set_tags({f"tdabench.env.{k}": json.dumps(v) if isinstance(v, dict) else str(v) for k, v in record.items()})
    return record


def job_device(spec: str, mlrun: tracking.Run):
    """The torch device of config value `device` on this job's host (DeviceError if it cannot be
    used: no silent CPU fallback), logged and tagged on the job's MLflow run."""
    from tdabench.device import describe, resolve_device

    device = resolve_device(spec)
    log.info("device: %s (config device: %s)", describe(device), spec)
    mlrun.set_tags({"tdabench.device": describe(device)})
    return device


def run_rule(job: JobContext) -> None:
    """Run the stage entry point the rule's contract names (tdabench.contracts)."""
    module, _, function = CONTRACTS[job.rule].entry.partition(":")
    run(getattr(importlib.import_module(module), function), job)


def run_job(job: JobContext) -> None:
    """`run_rule` as a workflow job: an error the user fixes (tdabench.errors.StudyError) ends the
    job with one line on the console (what, where, the fix, the log; the log file keeps the
    traceback), anything else with its traceback."""
    try:
        run_rule(job)
    except StudyError as e:
        where = "".join(f" {k}={v}" for k, v in job.wildcards.items())
        log_hint = f" (log: {job.log})" if job.log else ""
        print(f"[tdabench] error in rule {job.rule}{where}: {e}{log_hint}", file=sys.__stderr__, flush=True)
        raise SystemExit(1) from None


def run(stage: Callable[[JobContext, tracking.Run], None], job: JobContext) -> None:
    """Run one stage job: logging, its tracking record (params = the rule's params), its outputs'
    record, wall time."""
    with _log_to(job.log):
        log.info("rule %s wildcards %s threads %d", job.rule, job.wildcards, job.threads)
        start = time.perf_counter()
        with (
            numerics.active(job.numerics),
            tracking.job_run(job.rule, {**job.params, "numerics": job.numerics}, job.wildcards) as mlrun,
        ):
            stage(job, mlrun)
            if job.log is not None:  # a workflow job: its outputs go into the results manifest
                record_outputs(job.name, job.rule, job.wildcards, job.output.values())
            seconds = time.perf_counter() - start
            mlrun.log_metrics({"job_seconds": seconds})
            env = record_environment(job, mlrun)
        if env is not None:
            log.info(
                "numerics %s: %s kernels on %s, %d threads, pins %s",
                env["numerics"],
                env["kernel_level"],
                env["cpu_model"],
                env["threads"],
                env["env"],
            )
        log.info("done in %.1f s", seconds)
        where = "".join(f" {k}={v}" for k, v in job.wildcards.items())
        print(f"[tdabench] {job.rule}{where} done in {seconds:.1f} s", file=sys.__stderr__, flush=True)
