"""What every stage job shares: the job description, its typed params, logging to the rule's log
file, threads, and the MLflow child run."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tdabench import numerics, tracking
from tdabench.io import write_json

log = logging.getLogger("tdabench")
T = TypeVar("T")

# Rule name -> "module:function" of its stage entry point (one generic script runs them all:
# workflow/scripts/stage.py). The rule's `code` input lists the module's sources, so editing a
# library module reruns exactly the rules whose stage imports it.
STAGES = {
    "background": "tdabench.pipeline.dataset:main_background",
    "dataset": "tdabench.pipeline.dataset:main",
    "pretrain": "tdabench.pipeline.pretrain:main",
    "convert": "tdabench.pipeline.convert:main",
    "finetune": "tdabench.pipeline.finetune:main",
    "generate": "tdabench.pipeline.generate:main",
    "gradients": "tdabench.pipeline.gradients:main",
    "similarity": "tdabench.pipeline.similarity:main",
    "similarity_stream": "tdabench.pipeline.similarity:main_stream",
    "similarity_merge": "tdabench.pipeline.similarity:main_merge",
    "selection": "tdabench.pipeline.selection:main",
    "projection": "tdabench.pipeline.projection:main",
    "project_selected": "tdabench.pipeline.projection:main_selected",
    "costs": "tdabench.pipeline.costs:main",
    "evaluate": "tdabench.pipeline.evaluate:main",
    "summary": "tdabench.pipeline.summary:main",
}


def stage_module(rule: str) -> str:
    """The pipeline module a rule runs (its code dependencies start there)."""
    return STAGES[rule].partition(":")[0]


def code_digest() -> str:
    """Digest of every source file the study's stages run (tdabench.codedeps.study_digest)."""
    from tdabench.codedeps import study_digest

    return study_digest(sorted({stage_module(rule) for rule in STAGES}))


class ParamsError(ValueError):
    """A rule's params do not match its stage's typed Params (a workflow/library mismatch)."""


def typed(cls: type[T], data: dict, where: str = "params") -> T:
    """`data` as the dataclass `cls`: every field required, no unknown keys; nested dataclasses
    are built recursively, lists become tuples where a field says tuple. Defaults live in the
    config schema only, so nothing here fills one in."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in data]
    unknown = sorted(set(data) - set(names))
    if missing or unknown:
        raise ParamsError(f"{where}: {cls.__name__} needs {names}; missing {missing}, unknown {unknown}")
    return cls(**{n: _convert(hints[n], data[n], f"{where}.{n}") for n in names})


def _convert(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return typed(hint, value, where)
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


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
        return "-".join([self.rule, *(re.sub(r"[^\w.]", "_", str(v)) for v in self.wildcards.values())])

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
    """Run the stage entry point registered for `job.rule` (see STAGES)."""
    module, _, function = STAGES[job.rule].partition(":")
    run(getattr(importlib.import_module(module), function), job)


def run(stage: Callable[[JobContext, tracking.Run], None], job: JobContext) -> None:
    """Run one stage job: logging, MLflow child run (params = the rule's params), wall time."""
    with _log_to(job.log):
        log.info("rule %s wildcards %s threads %d", job.rule, job.wildcards, job.threads)
        start = time.perf_counter()
        with (
            numerics.active(job.numerics),
            tracking.job_run(job.rule, {**job.params, "numerics": job.numerics}, job.wildcards) as mlrun,
        ):
            stage(job, mlrun)
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
