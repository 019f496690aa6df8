"""What a study tells MLflow, written to disk first: results on disk are the truth, MLflow is the view.

Every Snakemake invocation gets a *tracking folder* `logs/mlflow/<invocation>/`: `study.json`
(the parent run: config params, commit and config-hash tags, start and end) is written by the
workflow's `onstart` / `onsuccess` / `onerror`, and each job writes `jobs/<job>.json` (its child
run: params, metrics with steps and times, tags, artifact paths, tables, nested runs) when it
ends, finished or failed. Jobs never talk to MLflow, so a slow, half-open or unreachable tracking
server cannot hang or fail a job, and a sqlite store is written by one process only.

`tdabench.mlflow_log.publish` turns the records into runs (the workflow calls it once at the end,
under a deadline; `tdabench log` replays by hand), idempotently: a record logged is marked, and a
replay finds runs by their record tag instead of creating them twice.

Jobs learn their folder from the environment variable TDABENCH_TRACKING_DIR (set by `onstart`);
a job without it (a library function called by hand) records nothing. Nothing here imports
MLflow, and logging never changes a result, so nothing here feeds a rule's params.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tdabench.errors import StudyError
from tdabench.io import write_json, write_text

ENV_DIR = "TDABENCH_TRACKING_DIR"  # this invocation's tracking folder (absolute)
TRACKING_ROOT = "logs/mlflow"  # under the workdir: one folder per invocation
FORMAT = 1
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value
log = logging.getLogger(__name__)


class TrackingError(StudyError, RuntimeError):
    """The MLflow tracking store cannot be used; names the URI and what to do."""


def now_ms() -> int:
    return int(time.time() * 1000)


def is_server(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("http://", "https://"))


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def check_sqlite_writable(uri: str) -> None:
    """A sqlite store whose folder cannot be written fails in one line (MLflow would retry for minutes)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path or sqlite:///relative/path
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    target = path if path.exists() else folder
    if not (target.is_dir() or target == path) or not os.access(target, os.W_OK):
        raise TrackingError(
            f"MLflow tracking store {uri}: {target} is not a writable folder; fix it or set mlflow.tracking_uri"
        )


def store_problem(uri: str | None, workdir: str | Path, timeout: float = 5) -> str | None:
    """Why the tracking store would not take runs now (a server not answering its health check, a
    sqlite folder not writable), or None. A hint only: the study runs either way."""
    uri = uri or default_tracking_uri(workdir)
    if is_server(uri):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as e:
            return f"MLflow tracking server {uri} is not reachable ({getattr(e, 'reason', e)})"
        return None
    try:
        check_sqlite_writable(uri)
    except TrackingError as e:
        return str(e)
    return None


def git_commit(repo: str | Path) -> tuple[str, bool]:
    """(commit sha or "unknown", whether the work tree has uncommitted changes)."""

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    if head.returncode:
        return "unknown", False
    return head.stdout.strip(), bool(dirty.stdout.strip())


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"}; lists as JSON; long values truncated to MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    value = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
    out[prefix.rstrip(".")] = value[:MAX_PARAM_CHARS]
    return out


# -- the study (parent run) -------------------------------------------------------------------


def start_study(config: dict, workdir: str | Path, repo: str | Path, cfg_hash: str) -> Path:
    """Write this invocation's study record and export its folder to jobs. Returns the folder."""
    mlcfg = config["mlflow"]
    workdir = Path(workdir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    invocation = f"{stamp}-{os.getpid()}"
    folder = workdir / TRACKING_ROOT / invocation
    (folder / "jobs").mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit(repo)
    tags = {
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": str(Path(repo).resolve() / "Snakefile"),
        "tdabench.git_commit": commit,
        "tdabench.git_dirty": str(dirty).lower(),
        "tdabench.config_hash": cfg_hash,
        "tdabench.kind": "study",
        "tdabench.invocation": invocation,
        "tdabench.workdir": str(workdir),
        "tdabench.host": socket.gethostname(),
        "tdabench.pid": str(os.getpid()),
    }
    study = {
        "format": FORMAT,
        "invocation": invocation,
        "tracking_uri": mlcfg["tracking_uri"],
        "experiment": mlcfg["experiment"],
        "run_name": f"study-{cfg_hash}-{stamp}",
        "tags": tags,
        "params": flatten({k: v for k, v in config.items() if k != "mlflow"}),
        "status": "RUNNING",
        "start_ms": now_ms(),
        "end_ms": None,
    }
    write_json(study, folder / "study.json")
    os.environ[ENV_DIR] = str(folder)
    return folder


def end_study(status: str) -> Path | None:
    """Record how this invocation ended (FINISHED / FAILED); the folder, or None if none was opened."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return None
    path = Path(folder) / "study.json"
    study = json.loads(path.read_text())
    study.update(status=status, end_ms=now_ms())
    write_json(study, path)
    return Path(folder)


# -- a job's record (child run) ---------------------------------------------------------------


def _numbers(metrics: dict) -> dict[str, float]:
    """Metrics as floats; None (not measured) left out, NaN kept: MLflow shows it, as it should."""
    return {k: float(v) for k, v in metrics.items() if v is not None}


class Run:
    """What one run will show in MLflow, recorded as operations. A handle without a record (no
    tracking folder: a library function called by hand) records nothing."""

    def __init__(self, ops: list | None = None, target: str = "job"):
        self.ops, self.target = ops, target
        self.sampler: SystemSampler | None = None

    @property
    def active(self) -> bool:
        return self.ops is not None

    def _add(self, op: str, **fields) -> None:
        if self.active:
            self.ops.append({"target": self.target, "op": op, "ms": now_ms(), **fields})

    def log_params(self, params: dict) -> None:
        self._add("params", params=flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._add("metrics", metrics=_numbers(metrics), step=int(step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._add("artifact", path=str(path), artifact_path=artifact_path)  # relative: to the workdir

    def log_dict(self, obj, name: str) -> None:
        self._add("dict", obj=obj, name=name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._add("tags", tags={k: str(v)[:MAX_TAG_CHARS] for k, v in tags.items()})

    def log_table(self, table, name: str) -> None:
        """A polars table as an MLflow table artifact (`name` ends in .json): previewable in the UI."""
        self._add("table", columns=table.to_dict(as_series=False), name=name)

    def log_input(self, table, name: str, source: str | Path, context: str) -> None:
        """The table at `source` as an MLflow dataset input (name, digest, schema, source path)."""
        self._add("input", source=str(source), name=name, context=context)

    def sample_system(self, interval: float = 10.0) -> None:
        """Record system metrics (SystemSampler) from now until the job ends: model jobs call it."""
        if self.active and self.sampler is None:
            self.sampler = SystemSampler(self, interval)
            self.sampler.start()

    def stop_sampling(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None

    def log_model(self, name: str, path: str | Path, fingerprint: str, params: dict | None = None) -> None:
        """The model this run wrote (a folder in the workdir) as an MLflow logged model that points
        to it: its fingerprint and path, no weights copied (a cluster's model stays where it is)."""
        self._add("model", name=name, path=str(path), fingerprint=fingerprint, params=flatten(params or {}))

    def use_model(self, path: str | Path) -> None:
        """This run read the model at `path`: linked as its input when a run of the study logged it."""
        self._add("model_input", path=str(path))

    def child(
        self,
        name: str,
        params: dict,
        metrics: dict[str, float],
        tags: dict[str, str] | None = None,
        step: int = 0,
        curves: dict[int, dict[str, float]] | None = None,
    ) -> None:
        """A finished run nested under this one (e.g. one per evaluated method), for the UI's
        compare view and parallel coordinates: `metrics` at `step`, and `curves` ({step: metrics})."""
        curves = [[int(s), _numbers(m)] for s, m in sorted((curves or {}).items())]
        fields = {"params": flatten(params), "metrics": _numbers(metrics), "tags": tags or {}, "step": int(step)}
        self._add("child", name=name, curves=curves, **fields)


_current: Run | None = None  # the job run being recorded in this process


def parent() -> Run:
    """The invocation's parent run, recorded through the current job's record (no-op outside one)."""
    return Run(_current.ops, target="parent") if _current is not None and _current.active else Run()


def job_name(rule: str, wildcards: dict | None) -> str:
    return "-".join([rule, *(re.sub(r"[^\w.]", "_", str(v)) for v in (wildcards or {}).values())])


class SystemSampler:
    """CPU, RAM and (where torch has a CUDA device in use) GPU memory of the host, sampled every
    `interval` seconds in a thread while a job runs, as MLflow's system metrics (`system/...`, the
    keys of mlflow.system_metrics, so the UI's system-metrics charts show them). Hand-rolled with
    psutil because MLflow's own monitor logs to a live run, and jobs talk to no server."""

    def __init__(self, run: Run, interval: float = 10.0):
        self.run, self.interval, self.step = run, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tdabench-system-metrics", daemon=True)

    def sample(self) -> dict[str, float]:
        import psutil

        memory = psutil.virtual_memory()
        out = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(),
            "system/system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
            "system/system_memory_usage_percentage": memory.percent,
            "system/process_rss_megabytes": psutil.Process().memory_info().rss / 2**20,
        }
        torch = sys.modules.get("torch")  # only a job that loaded torch and put work on a GPU
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                out[f"system/gpu_{i}_memory_usage_megabytes"] = (total - free) / 2**20
                out[f"system/gpu_{i}_memory_usage_percentage"] = 100 * (total - free) / total
        return out

    def record(self) -> None:
        try:
            metrics = self.sample()
        except Exception as e:  # noqa: BLE001  (a metric the host cannot give never fails a job)
            log.warning("system metrics not sampled: %s", e)
            return
        self.run.log_metrics(metrics, step=self.step)
        self.step += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.record()

    def start(self) -> None:
        import psutil

        psutil.cpu_percent()  # starts the CPU counter: the first sample then covers the interval
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.record()  # the last state, so a short job has a point too


@contextmanager
def job_run(rule: str, params: dict, wildcards: dict | None = None):
    """The job's child run, recorded to `jobs/<rule>-<wildcards>.json` when the job ends (status
    FAILED if it raises)."""
    global _current
    folder = os.environ.get(ENV_DIR)
    if not folder:
        yield Run()
        return
    wildcards = wildcards or {}
    tags = {"tdabench.rule": rule, "tdabench.kind": "job"}
    tags |= {f"tdabench.wildcard.{k}": str(v) for k, v in wildcards.items()}
    record = {
        "format": FORMAT,
        "job": job_name(rule, wildcards),
        "run_name": rule + "".join(f" {k}={v}" for k, v in wildcards.items()),
        "tags": tags,
        "status": "RUNNING",
        "start_ms": now_ms(),
        "ops": [],
    }
    run = Run(record["ops"])
    run.log_params({**params, **{f"wildcard.{k}": v for k, v in wildcards.items()}})
    _current = run
    try:
        yield run
        record["status"] = "FINISHED"
    except BaseException:
        record["status"] = "FAILED"
        raise
    finally:
        run.stop_sampling()
        _current = None
        record["end_ms"] = now_ms()
        # default=str: a table cell of a type JSON lacks (a date) shows as its text in MLflow
        write_text(json.dumps(record, default=str) + "\n", Path(folder) / "jobs" / f"{record['job']}.json")


def file_manifest(paths) -> list[dict]:
    """Path, size and (for HDF5) dataset shapes/dtypes of output files: logged instead of the files."""
    out = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        entry = {"path": str(p), "bytes": sum(f.stat().st_size for f in files)}
        if p.suffix == ".h5":
            import h5py

            datasets = {}

            def visit(name, obj, datasets=datasets):
                if isinstance(obj, h5py.Dataset):
                    datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}

            with h5py.File(p, "r") as f:
                f.visititems(visit)
            entry["datasets"] = datasets
        out.append(entry)
    return out
