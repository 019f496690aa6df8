"""Tracking records -> MLflow runs: the one place the study talks to MLflow.

`publish(workdir)` logs every invocation recorded under `logs/mlflow/` (tdabench.tracking writes
the records): a parent run per invocation, a child run per job, the summary's method runs nested
under it. It is idempotent. Each invocation keeps `logged.json` ({job: digest of the record
logged}), and every run carries its record's tag, so a replay after a crash finds a half-logged
record's runs, deletes them and logs the record again, and a second replay logs nothing.

Every MLflow request is bounded (`request_timeout_s`, one retry) and the whole call by
`deadline_s`; what is left is pending for the next call. The workflow runs it once at the end in a
subprocess it can kill (`run_bounded`), so a tracking server that hangs never holds a study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tdabench.io import write_json
from tdabench.tracking import TRACKING_ROOT, TrackingError, check_sqlite_writable, default_tracking_uri, is_server

REQUEST_TIMEOUT_S = 10
DEADLINE_S = 120
SOURCE_TAGS = (
    "mlflow.source.git.commit",
    "mlflow.source.name",
    "tdabench.git_commit",
    "tdabench.git_dirty",
    "tdabench.config_hash",
    "tdabench.invocation",
)
TERMINAL = ("FINISHED", "FAILED", "KILLED")
UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` (`make ui`) serves a sqlite store by default
log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one `publish` call did: runs logged, records still pending, and why."""

    logged: int = 0
    pending: int = 0
    uris: set[str] = field(default_factory=set)
    error: str | None = None
    experiments: dict[str, str] = field(default_factory=dict)  # uri -> experiment id logged to

    def view(self) -> str:
        """Where the runs are, in the UI's model-training view (the UI opens on GenAI otherwise)."""
        links = []
        for uri, exp_id in sorted(self.experiments.items()):
            page = f"#/experiments/{exp_id}/runs?workflowType=machine_learning"
            local = f"{UI_URL}/{page} (with `mlflow ui` running)"
            links.append(f"{uri.rstrip('/')}/{page}" if is_server(uri) else local)
        return "; open " + ", ".join(links) if links else ""

    def line(self) -> str:
        where = ", ".join(sorted(self.uris)) or "MLflow"
        if self.pending:
            why = f" ({self.error})" if self.error else ""
            return (
                f"MLflow logging pending: {self.pending} record(s) not yet in {where}{why}. The results on "
                "disk are complete; run `tdabench log` (make log) once the tracking store answers."
            )
        if not self.logged:
            return "MLflow: nothing pending"
        return f"MLflow: {self.logged} record(s) logged to {where}{self.view()}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def study_status(study: dict) -> str:
    """A study left RUNNING by an invocation whose process is gone (same host) was killed."""
    tags = study["tags"]
    if study["status"] == "RUNNING" and tags.get("tdabench.host") == socket.gethostname():
        pid = int(tags.get("tdabench.pid", "0") or 0)
        if pid and not _pid_alive(pid):
            return "KILLED"
    return study["status"]


def _bound_requests(request_timeout_s: int) -> None:
    """MLflow reads these per request: a hung server costs request_timeout_s x 2, not minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(request_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # not one "View run" line per run


class _Logger:
    """Logs the records of one invocation folder to one tracking store."""

    def __init__(self, client, uri: str, workdir: Path, folder: Path, study: dict):
        self.client, self.uri, self.workdir, self.folder, self.study = client, uri, workdir, folder, study
        self.states = _states(folder)
        self.state = self.states.setdefault(uri, {"jobs": {}})
        self.source = {k: v for k, v in study["tags"].items() if k in SOURCE_TAGS}
        self._models: list | None = None  # this workdir's logged models, read once per call

    def save(self) -> None:
        write_json(self.states, self.folder / "logged.json")

    def experiment(self) -> str:
        name, uri = self.study["experiment"], self.uri
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # A server keeps artifacts where it was told to (mlflow server --artifacts-destination);
            # a local store keeps them next to it in the workdir.
            location = None if is_server(uri) else (self.workdir / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":  # deleted in the UI: bring it back rather than fail
                self.client.restore_experiment(exp_id)
        # The model-training kind, for MLflow versions whose UI opens an experiment by it (3.17's
        # ignores it and opens the GenAI overview: links carry ?workflowType=machine_learning).
        self.client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
        return exp_id

    def _find(self, exp_id: str, tag: str, value: str) -> list:
        return self.client.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1000)

    def parent_run(self, exp_id: str) -> str:
        if self.state.get("parent"):
            return self.state["parent"]
        found = self._find(exp_id, "tdabench.invocation", self.study["invocation"])
        found = [r for r in found if r.data.tags.get("tdabench.kind") == "study"]
        if found:
            run_id = found[0].info.run_id
        else:
            run = self.client.create_run(
                exp_id, start_time=self.study["start_ms"], tags=self.study["tags"], run_name=self.study["run_name"]
            )
            run_id = run.info.run_id
            self.log_params(run_id, self.study["params"])
        self.state["parent"] = run_id
        self.save()
        return run_id

    def close_parent(self, parent_id: str) -> bool:
        """End the parent run as the study ended (False: still running, or already ended)."""
        status = study_status(self.study)
        if status not in TERMINAL or self.state.get("closed") == status:
            return False
        self.client.set_terminated(parent_id, status=status, end_time=self.study.get("end_ms"))
        self.state["closed"] = status
        self.save()
        return True

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        plist = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(plist), 100):
            self.client.log_batch(run_id, params=plist[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict, ms: int, step: int) -> None:
        from mlflow.entities import Metric

        mlist = [Metric(k, v, ms, step) for k, v in metrics.items()]
        for i in range(0, len(mlist), 1000):
            self.client.log_batch(run_id, metrics=mlist[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def apply(self, run_id: str, op: dict, record_tag: dict, exp_id: str) -> None:
        kind = op["op"]
        if kind == "params":
            self.log_params(run_id, op["params"])
        elif kind == "metrics":
            self.log_metrics(run_id, op["metrics"], op["ms"], op["step"])
        elif kind == "tags":
            self.set_tags(run_id, op["tags"])
        elif kind == "artifact":
            path = self.workdir / op["path"]
            if path.exists():
                self.client.log_artifact(run_id, str(path), op["artifact_path"])
            else:
                log.warning("MLflow: artifact %s is gone; not logged", path)
        elif kind == "dict":
            self.client.log_dict(run_id, op["obj"], op["name"])
        elif kind == "table":
            # log_table appends to an existing file: a replay must not add the rows twice
            folder, _, name = op["name"].rpartition("/")
            if name not in {Path(f.path).name for f in self.client.list_artifacts(run_id, folder or None)}:
                import pandas as pd

                self.client.log_table(run_id, data=pd.DataFrame(op["columns"]), artifact_file=op["name"])
        elif kind == "input":
            self.log_input(run_id, op)
        elif kind == "model":
            self.log_model(run_id, op, record_tag, exp_id)
        elif kind == "model_input":
            from mlflow.entities import LoggedModelInput

            found = [m for m in self.models(exp_id) if m.tags.get("tdabench.path") == op["path"]]
            if found:  # the latest model written at that path (the base model of a study is not logged)
                latest = max(found, key=lambda m: m.creation_timestamp)
                self.client.log_inputs(run_id, models=[LoggedModelInput(latest.model_id)])
        elif kind == "child":
            tags = {**self.source, **record_tag, "mlflow.parentRunId": run_id, **op["tags"]}
            child = self.client.create_run(exp_id, run_name=op["name"], tags=tags, start_time=op["ms"])
            self.log_params(child.info.run_id, op["params"])
            self.log_metrics(child.info.run_id, op["metrics"], op["ms"], op.get("step", 0))
            for step, metrics in op.get("curves", []):
                self.log_metrics(child.info.run_id, metrics, op["ms"], step)
            self.client.set_terminated(child.info.run_id, status="FINISHED", end_time=op["ms"])
        else:
            raise TrackingError(f"{self.folder}: unknown record operation {kind!r}")

    def models(self, exp_id: str) -> list:
        """The experiment's logged models written by this workdir's studies."""
        if self._models is None:
            self._models, token = [], None
            while True:
                page = self.client.search_logged_models([exp_id], max_results=100, page_token=token)
                self._models += [m for m in page if m.tags.get("tdabench.workdir") == str(self.workdir)]
                token = page.token
                if not token:
                    break
        return self._models

    def log_model(self, run_id: str, op: dict, record_tag: dict, exp_id: str) -> None:
        """A logged model without artifacts: the run that wrote it is its source (the runs
        table's Models column), its output at step 0; tags say where it is and which bytes."""
        from mlflow.entities import LoggedModelOutput

        for old in list(self.models(exp_id)):  # a half-logged try of this record
            if old.tags.get("tdabench.record") == record_tag["tdabench.record"]:
                self.client.delete_logged_model(old.model_id)
                self._models.remove(old)
        tags = {
            **self.source,
            **record_tag,
            "tdabench.workdir": str(self.workdir),
            "tdabench.path": op["path"],
            "tdabench.fingerprint": op["fingerprint"],
        }
        model = self.client.create_logged_model(
            exp_id, name=op["name"], source_run_id=run_id, tags=tags, params=op["params"], model_type="causal-lm"
        )
        self._models.append(self.client.finalize_logged_model(model.model_id, "READY"))
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])

    def log_input(self, run_id: str, op: dict) -> None:
        import mlflow.data
        import polars as pl
        from mlflow.entities import DatasetInput, InputTag

        source = self.workdir / op["source"]
        if not source.exists():
            log.warning("MLflow: dataset %s is gone; not logged", source)
            return
        dataset = mlflow.data.from_polars(pl.read_parquet(source), source=str(source.resolve()), name=op["name"])
        tags = [InputTag("mlflow.data.context", op["context"])]
        self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])

    def log_job(self, exp_id: str, parent_id: str, path: Path) -> bool:
        """Log one job record (False: already logged)."""
        job, digest = path.stem, _digest(path)
        if self.state["jobs"].get(job) == digest:
            return False
        record = json.loads(path.read_text())
        record_tag = {"tdabench.record": f"{self.study['invocation']}/{job}"}
        for old in self._find(exp_id, "tdabench.record", record_tag["tdabench.record"]):
            self.client.delete_run(old.info.run_id)  # a half-logged or outdated try of this record
        tags = {**self.source, **record["tags"], **record_tag, "mlflow.parentRunId": parent_id}
        run_id = self.client.create_run(
            exp_id, start_time=record["start_ms"], tags=tags, run_name=record["run_name"]
        ).info.run_id
        for op in record["ops"]:
            self.apply(parent_id if op["target"] == "parent" else run_id, op, record_tag, exp_id)
        self.client.set_terminated(run_id, status=record["status"], end_time=record.get("end_ms"))
        self.state["jobs"][job] = digest
        self.save()
        return True


def _states(folder: Path) -> dict:
    """{tracking uri: {"parent": run id, "closed": status, "jobs": {job: record digest}}}."""
    path = folder / "logged.json"
    return json.loads(path.read_text()) if path.exists() else {}


def invocation_folders(workdir: str | Path) -> list[Path]:
    return sorted(p.parent for p in (Path(workdir) / TRACKING_ROOT).glob("*/study.json"))


def _uri(study: dict, workdir: Path, tracking_uri: str | None) -> str:
    return tracking_uri or study["tracking_uri"] or default_tracking_uri(workdir)


def pending(workdir: str | Path, tracking_uri: str | None = None) -> int:
    """Records not yet logged to their store (jobs, and studies whose end is not logged)."""
    workdir, n = Path(workdir).resolve(), 0
    for folder in invocation_folders(workdir):
        study = json.loads((folder / "study.json").read_text())
        state = _states(folder).get(_uri(study, workdir, tracking_uri), {"jobs": {}})
        n += sum(state["jobs"].get(p.stem) != _digest(p) for p in (folder / "jobs").glob("*.json"))
        n += study_status(study) in TERMINAL and state.get("closed") != study_status(study)
    return n


def publish(
    workdir: str | Path = ".",
    tracking_uri: str | None = None,
    deadline_s: float | None = None,
    request_timeout_s: int = REQUEST_TIMEOUT_S,
) -> Report:
    """Log every pending record under `workdir` (tracking_uri: instead of the one each study
    recorded). Stops at the deadline or at the first store that fails; the rest stays pending."""
    workdir = Path(workdir).resolve()
    report = Report()
    if not pending(workdir, tracking_uri):
        return report
    _bound_requests(request_timeout_s)
    from mlflow import MlflowClient

    stop = time.monotonic() + deadline_s if deadline_s else None
    for folder in invocation_folders(workdir):
        study = json.loads((folder / "study.json").read_text())
        uri = _uri(study, workdir, tracking_uri)
        try:
            check_sqlite_writable(uri)
            logger = _Logger(MlflowClient(tracking_uri=uri), uri, workdir, folder, study)
            jobs = sorted((folder / "jobs").glob("*.json"), key=lambda p: p.stat().st_mtime)
            if all(logger.state["jobs"].get(p.stem) == _digest(p) for p in jobs) and (
                logger.state.get("closed") == study_status(study) or study_status(study) not in TERMINAL
            ):
                continue  # nothing new in this invocation (its store is not named in the report)
            report.uris.add(uri)
            exp_id = logger.experiment()
            report.experiments[uri] = exp_id
            parent_id = logger.parent_run(exp_id)
            for path in jobs:
                if stop is not None and time.monotonic() > stop:
                    report.error = f"deadline of {deadline_s:.0f} s reached"
                    break
                report.logged += logger.log_job(exp_id, parent_id, path)
            else:
                report.logged += logger.close_parent(parent_id)
        except Exception as e:  # noqa: BLE001  (any store failure leaves the records pending)
            report.uris.add(uri)
            first = str(e).splitlines()[0] if str(e) else ""
            if not isinstance(e, TrackingError) and len(first) > 200:  # MLflow's own: a retry trace
                first = first[:200] + "…"
            report.error = f"{type(e).__name__}: {first}"
            break
    report.pending = pending(workdir, tracking_uri)
    return report


def end_of_study(status: str, mlflow_config: dict, src: str | Path) -> str:
    """The workflow's `onsuccess` / `onerror`: record how the study ended, then log what is
    pending (this study's records, and any an earlier study left) under the config's deadline.
    Returns the one-line report."""
    from tdabench.tracking import end_study

    end_study(status)
    return run_bounded(Path.cwd(), mlflow_config["deadline_s"], mlflow_config["request_timeout_s"], src)


def run_bounded(workdir: str | Path, deadline_s: float, request_timeout_s: int, src: str | Path) -> str:
    """`publish` in a subprocess killed at the deadline, or at once on SIGTERM / SIGINT (a hung
    request cannot hold the caller); returns its one-line report. `src`: the checkout's src folder
    (the workflow's tdabench)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tdabench.cli", "log", str(workdir)]
    cmd += ["--deadline", str(deadline_s), "--request-timeout", str(request_timeout_s)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupted: list[int] = []

    def stop(signum, frame):
        interrupted.append(signum)
        proc.kill()

    handlers = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, stop)
    except ValueError:  # not the main thread: no handlers, the deadline still holds
        pass
    try:
        out, err = proc.communicate(timeout=deadline_s + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return Report(pending=pending(workdir), error=f"no answer within {deadline_s + 30:.0f} s").line()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if interrupted:
        return Report(pending=pending(workdir), error=f"interrupted by signal {interrupted[0]}").line()
    lines = [x for x in out.splitlines() if x.strip()]
    if proc.returncode and not lines:
        tail = (err.strip().splitlines() or ["?"])[-1]
        return Report(pending=pending(workdir), error=tail).line()
    return lines[-1] if lines else Report().line()
