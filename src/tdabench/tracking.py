"""MLflow tracking: one parent run per Snakemake invocation, one child run per job.

The parent is opened by the workflow's `onstart` (which Snakemake runs only when jobs will
execute: dry runs and no-op runs open nothing) and closed by `onsuccess` / `onerror`. Jobs learn
where to log from three environment variables set there; a job without them (MLflow disabled, or
a library function called by hand) logs nothing. `MLFLOW_RUN_ID` is deliberately not used: it
would make every job write into the parent itself.
Logging never changes a result, so nothing here feeds a rule's params.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ENV_URI = "TDABENCH_MLFLOW_TRACKING_URI"
ENV_EXPERIMENT = "TDABENCH_MLFLOW_EXPERIMENT_ID"
ENV_PARENT = "TDABENCH_MLFLOW_PARENT_RUN_ID"
ENV_SOURCE_TAGS = "TDABENCH_MLFLOW_SOURCE_TAGS"  # JSON: the parent's source/commit tags, set on every run
SOURCE_TAGS = (
    "mlflow.source.git.commit",
    "mlflow.source.name",
    "tdabench.git_commit",
    "tdabench.git_dirty",
    "tdabench.config_hash",
)
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value
REACH_TIMEOUT_S = 10  # an unreachable server fails the invocation at start, not after MLflow's retries
log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; names the URI and what to do."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast when an HTTP tracking server does not answer its health check."""
    if not is_server(uri):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({getattr(e, 'reason', e)}); start it, fix "
            "mlflow.tracking_uri, or set mlflow.enabled: false"
        ) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_stale_studies(client, exp_id: str, workdir: str) -> list[str]:
    """Parent runs of this workdir on this host left RUNNING by a killed invocation (its process is
    gone; Snakemake's lock keeps two live invocations out of one workdir) are marked KILLED."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`tdabench.kind` = 'study' "
        f"and tags.`tdabench.workdir` = '{workdir}' and tags.`tdabench.host` = '{socket.gethostname()}'",
        max_results=1000,
    )
    closed = []
    for run in runs:
        pid = int(run.data.tags.get("tdabench.pid", "0") or 0)
        if pid and not _pid_alive(pid):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            log.warning("MLflow: parent run %s of a killed invocation (pid %d) marked KILLED", run.info.run_id, pid)
    return closed


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_root: str | Path | None) -> str:
    """Create the store (sqlite schema) and experiment once, before jobs run in parallel.
    artifact_root None: the tracking server's default artifact location."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
        exp_id = client.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":  # deleted in the UI: bring it back rather than fail
            client.restore_experiment(exp_id)
    # Open it in the UI's model-training view (runs table), not the GenAI overview.
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    return exp_id


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


def check_remote_store(uri: str) -> None:
    """Jobs of a cluster executor run on many nodes at once: a sqlite file (or file store) in the
    workdir would be written concurrently over a shared filesystem, which sqlite's locking does not
    survive. Refuse before anything is submitted."""
    if not is_server(uri):
        raise TrackingError(
            f"mlflow.tracking_uri is {uri}, a local store, but jobs run through a cluster executor on "
            "other nodes, which would write it concurrently over a shared filesystem. Start a tracking "
            "server (make mlflow-server, on a host the nodes can reach) and pass "
            '--config \'mlflow={"tracking_uri": "http://HOST:5000"}\', or set mlflow.enabled: false'
        )


def start_study(config: dict, workdir: str | Path, repo: str | Path, cfg_hash: str, remote_jobs: bool = False) -> str:
    """Open the parent run of this invocation and export its coordinates to jobs. Returns run id.
    remote_jobs: jobs run through a cluster executor (a local store is refused then)."""
    mlcfg = config["mlflow"]
    uri = mlcfg["tracking_uri"] or default_tracking_uri(workdir)
    if remote_jobs:
        check_remote_store(uri)
    check_reachable(uri)
    # A server keeps artifacts where it was told to (mlflow server --artifacts-destination) and
    # proxies uploads; a local store keeps them next to it in the workdir.
    exp_id = ensure_experiment(uri, mlcfg["experiment"], None if is_server(uri) else Path(workdir) / "mlartifacts")
    workdir = str(Path(workdir).resolve())
    close_stale_studies(_client(uri), exp_id, workdir)
    commit, dirty = git_commit(repo)
    tags = {
        "mlflow.source.git.commit": commit,
        "tdabench.git_commit": commit,
        "tdabench.git_dirty": str(dirty).lower(),
        "tdabench.config_hash": cfg_hash,
        "tdabench.kind": "study",
        "mlflow.source.name": str(Path(repo).resolve() / "Snakefile"),
        "tdabench.workdir": workdir,
        "tdabench.host": socket.gethostname(),
        "tdabench.pid": str(os.getpid()),
    }
    client = _client(uri)
    run = client.create_run(exp_id, tags=tags, run_name=f"study-{cfg_hash}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_id = run.info.run_id
    params = flatten({k: v for k, v in config.items() if k != "mlflow"})
    _log_batch(client, run_id, params=params)
    os.environ[ENV_URI] = uri
    os.environ[ENV_EXPERIMENT] = exp_id
    os.environ[ENV_PARENT] = run_id
    os.environ[ENV_SOURCE_TAGS] = json.dumps({k: tags[k] for k in SOURCE_TAGS})
    return run_id


def source_tags() -> dict[str, str]:
    """Commit, config hash and source of this invocation (from its parent run), for every run."""
    return json.loads(os.environ.get(ENV_SOURCE_TAGS, "{}"))


def end_study(status: str) -> None:
    """Close the parent run opened by `start_study` (no-op if none)."""
    uri, parent = os.environ.get(ENV_URI), os.environ.get(ENV_PARENT)
    if uri and parent:
        _client(uri).set_terminated(parent, status=status)


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


def _log_batch(
    client, run_id: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None, step: int = 0
) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    plist = [Param(k, v) for k, v in (params or {}).items()]
    mlist = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
    for i in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[i : i + 100])
    for i in range(0, len(mlist), 1000):
        client.log_batch(run_id, metrics=mlist[i : i + 1000])


class Run:
    """Handle of one MLflow run; every method is a no-op when tracking is off (run_id None)."""

    def __init__(self, client=None, run_id: str | None = None):
        self.client, self.run_id = client, run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: dict) -> None:
        if self.active:
            _log_batch(self.client, self.run_id, params=flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.active:
            _log_batch(self.client, self.run_id, metrics=metrics, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj, name: str) -> None:
        if self.active:
            self.client.log_dict(self.run_id, obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()])

    def log_table(self, table, name: str) -> None:
        """A polars table as an MLflow table artifact (`name` ends in .json): previewable in the UI."""
        if self.active:
            self.client.log_table(self.run_id, data=table.to_pandas(), artifact_file=name)

    def log_input(self, table, name: str, source: str | Path, context: str) -> None:
        """Log a polars table as an MLflow dataset input (name, digest, schema, source path)."""
        if not self.active:
            return
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        dataset = mlflow.data.from_polars(table, source=str(Path(source).resolve()), name=name)
        self.client.log_inputs(
            self.run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
        )

    def child(self, name: str, params: dict, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        """A finished run nested under this one (e.g. one per evaluated method), for the UI's
        compare view and parallel coordinates."""
        if not self.active:
            return
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        tags = {**source_tags(), "mlflow.parentRunId": self.run_id, **(tags or {})}
        run = self.client.create_run(exp_id, run_name=name, tags=tags)
        child = Run(self.client, run.info.run_id)
        child.log_params(params)
        child.log_metrics(metrics)
        self.client.set_terminated(child.run_id, status="FINISHED")


def parent() -> Run:
    """The invocation's parent run (for the summary job), or a no-op handle."""
    uri, run_id = os.environ.get(ENV_URI), os.environ.get(ENV_PARENT)
    return Run(_client(uri), run_id) if uri and run_id else Run()


@contextmanager
def job_run(rule: str, params: dict, wildcards: dict | None = None):
    """Child run of the current invocation, named after the rule; FAILED if the job raises."""
    uri, exp_id, parent_id = (os.environ.get(v) for v in (ENV_URI, ENV_EXPERIMENT, ENV_PARENT))
    if not (uri and exp_id and parent_id):
        yield Run()
        return
    client = _client(uri)
    tags = {**source_tags(), "mlflow.parentRunId": parent_id, "tdabench.rule": rule, "tdabench.kind": "job"}
    for k, v in (wildcards or {}).items():
        tags[f"tdabench.wildcard.{k}"] = str(v)
    suffix = "".join(f" {k}={v}" for k, v in (wildcards or {}).items())
    run = Run(client, client.create_run(exp_id, tags=tags, run_name=rule + suffix).info.run_id)
    run.log_params({**params, **{f"wildcard.{k}": v for k, v in (wildcards or {}).items()}})
    try:
        yield run
    except BaseException:
        client.set_terminated(run.run_id, status="FAILED")
        raise
    client.set_terminated(run.run_id, status="FINISHED")


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
