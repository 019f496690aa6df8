"""The study through the real SLURM executor plugin and a real MLflow tracking server.

`snakemake-executor-plugin-slurm` submits every non-local job with `sbatch`; the shim commands in
tests/slurm_shim run each as a local process and answer `sacct` like SLURM would, and record every
sbatch call. A real `mlflow server` on 127.0.0.1 receives the runs: jobs record them on the shared
workdir, the submit host logs them at the end, and artifacts are uploaded through the server.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient

from test_workflow import MICRO
from workflow_helpers import (
    REPO,
    SNAKEMAKE,
    copy_repo,
    free_port,
    half_open_server,
    mlflow_server,
    snakemake,
    write_config,
)

pytestmark = [pytest.mark.workflow, pytest.mark.long]
CLI = str(Path(sys.executable).with_name("tdabench"))
SHIM = REPO / "tests" / "slurm_shim"
THREADS = 2  # config resources.threads: no sbatch call may ask for more CPUs
LOCAL = {"all", "background", "dataset", "selection", "evaluate", "summary"}
# The micro study, smaller still: one query setting and one projection method (8 cluster jobs).
CLUSTER = {
    **MICRO,
    "dataset": {**MICRO["dataset"], "settings": ["paraphrased"]},
    "projection": {**MICRO["projection"], "methods": ["sjlt"]},
    "resources": {"threads": THREADS},
}


@pytest.fixture(scope="module")
def mlflow_server_url(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts; stopped after."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(f"sqlite:///{root / 'server.db'}", root / "server.log", artifacts=root / "art") as url:
        yield url, root


def slurm_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{SHIM}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        SLURM_SHIM_LOG=str(root / "sbatch.jsonl"),
        SLURM_SHIM_ACCOUNTS="your_account",  # the placeholders of profiles/slurm, used as they are
        SLURM_SHIM_PARTITIONS="your_partition",
        SLURM_SHIM_MAX_CPUS=str(THREADS),  # sbatch refuses bigger requests, as a cluster without such nodes would
        SLURM_SHIM_SACCT_WAIT="30",
        HF_HUB_OFFLINE="1",
    )
    return env


def submit(root: Path, *args, timeout=1500):
    """snakemake with profiles/slurm (the real plugin) against the shim; fast status polling."""
    cmd = [SNAKEMAKE, "--workflow-profile", "profiles/slurm", "--jobs", "4", "--retries", "0", "--latency-wait", "5"]
    cmd += ["--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs", *args]
    try:
        return subprocess.run(cmd, cwd=root, env=slurm_env(root), capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run([str(SHIM / "scancel"), "--me"], env=slurm_env(root), capture_output=True)


def sbatch_calls(root: Path) -> list[dict]:
    path = root / "sbatch.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rules_of(call: dict) -> str:
    return call["options"]["comment"]  # the plugin's comment: rule_<name>[_wildcards_…] or group_<name>


@pytest.fixture(scope="module")
def cluster_study(tmp_path_factory, mlflow_server_url):
    uri, _ = mlflow_server_url
    root = copy_repo(tmp_path_factory.mktemp("cluster"))
    write_config(root, {**CLUSTER, "mlflow": {"tracking_uri": uri}})
    start = time.time()
    run = submit(root)
    return root, None, run, time.time() - start


def test_the_study_completes_through_the_slurm_plugin(cluster_study):
    root, _, run, seconds = cluster_study
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    metrics = pl.read_parquet(root / "results/evaluation/metrics.parquet")
    assert {"full", "greedy", "projection"} <= set(metrics["method"])
    print(f"cluster study: {seconds:.0f} s")


def test_sbatch_calls_ask_for_what_each_rule_declares_and_never_more_cpus_than_configured(cluster_study):
    root, _, run, _ = cluster_study
    calls = sbatch_calls(root)
    submitted = {rules_of(c).split("_wildcards")[0] for c in calls}
    # Model rules and store readers are cluster jobs; bookkeeping stays on the submit host.
    assert {"rule_pretrain", "rule_finetune", "rule_gradients", "rule_costs"} <= submitted
    assert {"rule_similarity", "rule_projection"} <= submitted
    assert not {f"rule_{r}" for r in LOCAL} & submitted
    assert sum(1 for c in calls if rules_of(c).startswith("rule_gradients")) == 3  # 2 train shards + queries
    for c in calls:
        opts = c["options"]
        assert int(opts["cpus-per-task"]) <= THREADS, (rules_of(c), opts)
        assert int(opts["mem"]) >= 1500 and int(opts["time"]) >= 10, (rules_of(c), opts)
        assert "gpus" not in opts and "gres" not in opts  # device: auto on a CPU host asks for no GPU
        assert opts["account"] == "your_account" and opts["partition"] == "your_partition"
    model_jobs = [c for c in calls if rules_of(c).startswith(("rule_pretrain", "rule_finetune", "rule_costs"))]
    assert all(int(c["options"]["cpus-per-task"]) == THREADS for c in model_jobs)  # costs: was 256


def test_every_job_logged_to_the_tracking_server_with_artifacts(cluster_study, mlflow_server_url, tmp_path):
    root, _, run, _ = cluster_study
    uri, server_root = mlflow_server_url
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tdabench")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's, not a file:// path
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tdabench.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    jobs = [r for r in runs if r.data.tags.get("tdabench.kind") == "job"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs)
    rules = sorted(r.data.tags["tdabench.rule"] for r in jobs)  # local jobs log too
    assert rules.count("gradients") == 3 and {"dataset", "pretrain", "costs", "similarity", "summary"} <= set(rules)
    assert all(r.info.status == "FINISHED" for r in jobs)
    device = {r.data.tags.get("tdabench.device") for r in jobs if r.data.tags["tdabench.rule"] == "gradients"}
    assert device == {"cpu"}
    # Artifacts went through the server into its artifact store and come back through its API.
    finetune = next(r for r in jobs if r.data.tags["tdabench.rule"] == "finetune")
    local = client.download_artifacts(finetune.info.run_id, "finetune_report.json", str(tmp_path))
    report = json.loads(Path(local).read_text())
    assert report == json.loads((root / "results/models/finetune_report.json").read_text())
    assert any((server_root / "art").rglob("finetune_report.json"))
    assert parents[0].data.metrics  # the summary job's headline metrics, logged into the parent


def test_a_half_open_tracking_server_never_holds_the_study(cluster_study, tmp_path):
    """A server that answers /health but no API call: the study ends with its results and the
    MLflow side pending; `tdabench log` fills the server once it answers, and only once. Here,
    on the cluster study's workdir with the local executor, before the CUDA test below breaks it."""
    root, _, run, _ = cluster_study
    port = free_port()
    cfg = {**CLUSTER, "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}", "deadline_s": 5, "request_timeout_s": 2}}
    write_config(root, cfg)  # mlflow.* reruns nothing (test_scheduling_keys_rerun_nothing)
    with half_open_server(port):
        start = time.monotonic()
        r = snakemake(root, "--forcerun", "summary")
        took = time.monotonic() - start
    out = r.stdout + r.stderr
    assert took < 180 and "MLflow logging pending: 2 record(s)" in out, out[-3000:]  # the summary job, the study
    assert (root / "results/summary.md").stat().st_mtime > time.time() - took
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server.log", port=port) as url:
        logged = subprocess.run([CLI, "log"], cwd=root, capture_output=True, text=True)
        assert logged.returncode == 0 and f"MLflow: 2 record(s) logged to {url}" in logged.stdout, logged.stderr
        again = subprocess.run([CLI, "log"], cwd=root, capture_output=True, text=True)
        assert again.returncode == 0 and again.stdout.strip() == "MLflow: nothing pending"
        client = MlflowClient(url)
        server_runs = client.search_runs([client.get_experiment_by_name("tdabench").experiment_id], max_results=1000)
    kinds = sorted(r.data.tags.get("tdabench.kind") for r in server_runs)
    assert kinds.count("study") == 1 and kinds.count("job") == 1 and kinds.count("method") >= 5
    assert all(r.info.status == "FINISHED" for r in server_runs)
    parent = next(r for r in server_runs if r.data.tags["tdabench.kind"] == "study")
    assert "paraphrased.greedy.top1" in parent.data.metrics


def test_device_cuda_asks_slurm_for_gpus_and_a_job_without_cuda_stops_clearly(cluster_study, mlflow_server_url):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error on a host without CUDA")
    root, _, _, _ = cluster_study
    uri, _ = mlflow_server_url
    before = len(sbatch_calls(root))
    cfg = {**CLUSTER, "device": "cuda", "mlflow": {"tracking_uri": uri}}
    write_config(root, cfg)
    r = submit(root)  # the submit host has no GPU: submitting is allowed, the job itself refuses
    calls = sbatch_calls(root)[before:]
    assert r.returncode != 0
    assert calls and rules_of(calls[0]).startswith("rule_pretrain")
    assert calls[0]["options"]["gpus"] == "1"
    log = (root / "logs" / "pretrain.log").read_text()
    assert "config key device is 'cuda', but CUDA is not available" in log
