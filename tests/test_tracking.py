"""Tracking: jobs record their runs on disk, `tdabench.mlflow_log.publish` logs them to MLflow
once (a replay adds nothing), bounded when the store does not answer."""

import json
import math
import os
import subprocess
import sys
import time

import polars as pl
import pytest
from mlflow import MlflowClient

from tdabench import mlflow_log, tracking
from tdabench.config import validate_config

from workflow_helpers import free_port, half_open_server

pytestmark = pytest.mark.slow  # each test creates an MLflow store or starts a process: about a minute in all
CLI = [sys.executable, "-m", "tdabench.cli"]
SRC = tracking.__file__.rsplit("/", 2)[0]  # the tdabench under test


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A study's workdir as the cwd, with the tracking folder's variable removed after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.ENV_DIR, raising=False)
    yield tmp_path
    os.environ.pop(tracking.ENV_DIR, None)


def record_study(uri=None, fail_second=True):
    """An invocation as the workflow records it: a dataset job (a table input, a table, an
    artifact, parent metrics), a summary job with two nested runs, and a failed job."""
    config = validate_config({"mlflow": {"tracking_uri": uri}})
    folder = tracking.start_study(config, workdir=".", repo=".", cfg_hash="abc")
    pl.DataFrame({"id": ["a", "b"], "n": [1, 2]}).write_parquet("train.parquet")
    with tracking.job_run("dataset", {"seed": 3, "nested": {"k": [1, 2]}}, {"split": "train"}) as run:
        run.log_metrics({"n_train": 2, "loss": float("nan"), "unset": None}, step=1)  # NaN kept, None left out
        run.log_table(pl.read_parquet("train.parquet"), "results/train.json")
        run.log_input(pl.read_parquet("train.parquet"), "train", "train.parquet", "training")
        run.log_artifact("train.parquet", "results")
        tracking.parent().log_metrics({"headline": 0.5})
        tracking.parent().log_table(pl.DataFrame({"x": [1.0]}), "results/headline.json")
    with tracking.job_run("summary", {"settings": ["p"]}) as run:
        run.sample_system(interval=0.05)
        curve = {10: {"p/top1_vs_dim": 0.1}, 40: {"p/top1_vs_dim": 0.25}}  # e.g. greedy prefixes
        run.child("greedy", {"k": 4}, {"top1": 0.25}, step=40, curves=curve)
        run.child("full", {"k": ""}, {"top1": 0.75})
        time.sleep(0.3)
    if fail_second:
        with pytest.raises(RuntimeError), tracking.job_run("evaluate", {}) as run:
            run.log_metrics({"partial": 1})
            raise RuntimeError("boom")
    tracking.end_study("FINISHED")
    return folder


def all_runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tdabench")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_a_job_without_a_tracking_folder_records_nothing(workdir):
    with tracking.job_run("dataset", {"a": 1}) as run:
        assert not run.active
        run.log_metrics({"m": 1})
        assert not tracking.parent().active
    assert not (workdir / "logs").exists()


def test_records_are_logged_once_and_a_replay_adds_nothing(workdir):
    folder = record_study()
    uri = tracking.default_tracking_uri(workdir)
    assert mlflow_log.pending(workdir) == 4  # 3 jobs and the study's end
    report = mlflow_log.publish(workdir)
    assert (report.logged, report.pending) == (4, 0), report.line()
    client, runs = all_runs(uri)
    by_name = {r.info.run_name: r for r in runs}
    parent = next(r for r in runs if r.data.tags.get("tdabench.kind") == "study")
    assert parent.info.status == "FINISHED" and parent.data.metrics == {"headline": 0.5}
    assert parent.data.params["seed"] == "0" and "mlflow" not in json.dumps(list(parent.data.params))
    dataset = by_name["dataset split=train"]
    assert dataset.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert dataset.data.params == {"seed": "3", "nested.k": "[1, 2]", "wildcard.split": "train"}
    assert set(dataset.data.metrics) == {"n_train", "loss"} and dataset.data.metrics["n_train"] == 2.0
    assert math.isnan(dataset.data.metrics["loss"])  # a NaN result shows in MLflow, not hidden
    assert dataset.data.tags["tdabench.config_hash"] == "abc"  # the study's source tags on every run
    assert {d.dataset.name for d in client.get_run(dataset.info.run_id).inputs.dataset_inputs} == {"train"}
    assert {f.path for f in client.list_artifacts(dataset.info.run_id, "results")} == {
        "results/train.json",
        "results/train.parquet",
    }
    assert by_name["evaluate"].info.status == "FAILED" and by_name["evaluate"].data.metrics == {"partial": 1.0}
    summary = by_name["summary"]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.info.run_id]
    assert sorted((r.info.run_name, r.data.metrics["top1"]) for r in nested) == [("full", 0.75), ("greedy", 0.25)]
    greedy = next(r for r in nested if r.info.run_name == "greedy")
    assert [m.step for m in client.get_metric_history(greedy.info.run_id, "top1")] == [40]  # step = its dimension
    history = client.get_metric_history(greedy.info.run_id, "p/top1_vs_dim")
    assert sorted((m.step, m.value) for m in history) == [(10, 0.1), (40, 0.25)]
    memory = client.get_metric_history(summary.info.run_id, "system/system_memory_usage_megabytes")
    assert len(memory) >= 3 and all(m.value > 0 for m in memory)  # sampled while the job ran, and at its end
    assert {"system/cpu_utilization_percentage", "system/process_rss_megabytes"} <= set(summary.data.metrics)
    assert "system/cpu_utilization_percentage" not in by_name["dataset split=train"].data.metrics  # not enabled
    assert len(runs) == 1 + 3 + 2

    again = mlflow_log.publish(workdir)
    assert (again.logged, again.pending) == (0, 0) and again.line() == "MLflow: nothing pending"
    # Even with the local state lost, a replay finds the runs by their record tags: no duplicates.
    (folder / "logged.json").unlink()
    mlflow_log.publish(workdir)
    client, runs_after = all_runs(uri)
    assert len(runs_after) == len(runs)
    table = client.download_artifacts(parent.info.run_id, "results/headline.json")
    assert len(json.loads(open(table).read())["data"]) == 1  # log_table would have appended a second row


def test_the_report_names_only_the_stores_it_logged_to(workdir):
    """A workdir whose first study went to one store and whose second goes to another: logging the
    second names only its store (the first has nothing new)."""
    first, second = (f"sqlite:///{workdir / name}" for name in ("first.db", "second.db"))
    record_study(first, fail_second=False)
    assert mlflow_log.publish(workdir).uris == {first}
    record_study(second, fail_second=False)
    report = mlflow_log.publish(workdir)
    assert report.uris == {second} and f"logged to {second};" in report.line(), report.line()


def test_a_half_logged_record_is_logged_again_whole(workdir, monkeypatch):
    record_study(fail_second=False)
    real = mlflow_log._Logger.apply

    def fail_on_nested(self, run_id, op, record_tag, exp_id):
        if op["op"] == "child" and op["name"] == "full":
            raise ConnectionError("the store went away")
        return real(self, run_id, op, record_tag, exp_id)

    monkeypatch.setattr(mlflow_log._Logger, "apply", fail_on_nested)
    report = mlflow_log.publish(workdir)
    assert report.pending == 2 and "ConnectionError: the store went away" in report.error  # summary + study end
    assert "MLflow logging pending: 2 record(s)" in report.line() and "tdabench log" in report.line()
    monkeypatch.setattr(mlflow_log._Logger, "apply", real)
    assert mlflow_log.publish(workdir).pending == 0
    _, runs = all_runs(tracking.default_tracking_uri(workdir))
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("tdabench.kind") != "study") == [
        "dataset split=train",
        "full",
        "greedy",
        "summary",
    ]


def test_a_study_whose_process_is_gone_is_closed_as_killed(workdir, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(os, "getpid", lambda: int(dead.stdout))
    tracking.start_study(validate_config({}), workdir=".", repo=".", cfg_hash="x")  # never ended
    monkeypatch.undo()
    assert mlflow_log.publish(workdir).pending == 0
    _, runs = all_runs(tracking.default_tracking_uri(workdir))
    assert [r.info.status for r in runs] == ["KILLED"]


def test_an_unreachable_server_leaves_the_records_pending_in_seconds(workdir):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    record_study(uri)
    assert "is not reachable" in tracking.store_problem(uri, workdir)
    start = time.monotonic()
    report = mlflow_log.publish(workdir, request_timeout_s=1)
    assert report.pending == 4 and report.logged == 0
    assert time.monotonic() - start < 60


def test_a_half_open_server_is_cut_off_at_the_deadline(workdir):
    port = free_port()
    with half_open_server(port) as uri:
        record_study(uri)
        assert tracking.store_problem(uri, workdir) is None  # it answers its health check
        start = time.monotonic()
        line = mlflow_log.run_bounded(
            workdir, deadline_s=2, request_timeout_s=1, src=tracking.__file__.rsplit("/", 2)[0]
        )
        took = time.monotonic() - start
    assert line.startswith("MLflow logging pending: 4 record(s)"), line
    assert took < 45  # 2 s deadline + at most one request's timeouts + the subprocess' start


def test_an_unusable_sqlite_store_is_one_line(workdir):
    (workdir / "a_file").write_text("not a folder")
    uri = f"sqlite:///{workdir / 'a_file' / 'sub' / 'mlflow.db'}"
    record_study(uri)
    assert "a_file is not a writable folder" in tracking.store_problem(uri, workdir)
    report = mlflow_log.publish(workdir)
    assert report.pending == 4 and "a_file is not a writable folder" in report.error


def test_the_log_command_replays_and_says_what_is_pending(workdir):
    env = {**os.environ, "PYTHONPATH": SRC}
    none = subprocess.run([*CLI, "log"], capture_output=True, text=True, env=env)
    assert none.returncode == 2 and "no tracking records under" in none.stderr
    record_study(fail_second=False)
    done = subprocess.run([*CLI, "log", str(workdir)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "MLflow: 3 record(s) logged to sqlite:///" in done.stdout, done.stderr
    again = subprocess.run([*CLI, "log", str(workdir)], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and again.stdout.strip() == "MLflow: nothing pending"


def test_sigterm_ends_the_logging_at_once_and_leaves_it_pending(workdir):
    port = free_port()
    with half_open_server(port) as uri:
        record_study(uri)
        code = (
            "import sys; from tdabench.mlflow_log import run_bounded; "
            f"print(run_bounded({str(workdir)!r}, 120, 30, {SRC!r}))"
        )
        env = {**os.environ, "PYTHONPATH": SRC}
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        time.sleep(8)  # the logger is waiting on the server by now
        start = time.monotonic()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - start
    assert proc.returncode == 0 and "MLflow logging pending: 4 record(s)" in out and "interrupted by signal 15" in out
    assert took < 10


def test_the_finetuned_model_is_logged_by_reference_and_linked_to_the_runs_that_read_it(workdir):
    config = validate_config({})
    tracking.start_study(config, workdir=".", repo=".", cfg_hash="abc")
    (workdir / "model").mkdir()
    (workdir / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    with tracking.job_run("finetune", {}) as run:
        run.use_model("base")  # a model no run logged: no link, no error
        run.log_model("finetuned", "model", "f1ngerprint", {"parameters": 1024})
    with tracking.job_run("gradients", {}) as run:
        run.use_model("model")
    tracking.end_study("FINISHED")
    for _ in range(2):  # a replay replaces, never duplicates
        assert mlflow_log.publish(workdir).pending == 0
        (workdir / "logs/mlflow").glob("*/logged.json").__next__().unlink()
    client, runs = all_runs(tracking.default_tracking_uri(workdir))
    by_name = {r.info.run_name: r for r in runs}
    exp_id = runs[0].info.experiment_id
    models = client.search_logged_models([exp_id])
    assert len(models) == 1
    model = models[0]
    assert model.source_run_id == by_name["finetune"].info.run_id  # the runs table's Models column
    assert model.tags["tdabench.fingerprint"] == "f1ngerprint" and model.tags["tdabench.path"] == "model"
    assert model.params == {"parameters": "1024"} and str(model.status) in ("READY", "LoggedModelStatus.READY")
    assert not [a for a in client.list_artifacts(by_name["finetune"].info.run_id)]  # no weights copied
    inputs = client.get_run(by_name["gradients"].info.run_id).inputs.model_inputs
    assert [i.model_id for i in inputs] == [model.model_id]
    assert client.get_run(by_name["finetune"].info.run_id).outputs.model_outputs[0].model_id == model.model_id


def test_a_host_that_cannot_give_system_metrics_never_fails_the_job(workdir, monkeypatch):
    import psutil

    tracking.start_study(validate_config({}), workdir=".", repo=".", cfg_hash="abc")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: (_ for _ in ()).throw(OSError("no /proc")))
    with tracking.job_run("gradients", {}) as run:
        run.sample_system(interval=0.01)
        time.sleep(0.1)
        run.log_metrics({"n": 1})
    record = json.loads(next((workdir / "logs/mlflow").glob("*/jobs/gradients.json")).read_text())
    assert record["status"] == "FINISHED"
    logged = {k for op in record["ops"] if op["op"] == "metrics" for k in op["metrics"]}
    assert logged == {"n"}
