"""`tdabench doctor` and what `make install` ends with: each check fails on the problem it names."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tdabench import doctor, numerics
from tdabench.cli import build_parser

CLI = str(Path(sys.executable).with_name("tdabench"))
REPO = Path(__file__).resolve().parents[1]


def run_doctor(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run([CLI, "doctor", *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def config_file(tmp_path: Path, content: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def by_name(checks) -> dict[str, doctor.Check]:
    return {c.what: c for c in checks}


def test_a_fresh_workdir_is_ready_and_every_check_is_shown(tmp_path):
    r = run_doctor("--directory", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    for what in ("torch", "config", "device", "numerics", "MLflow", "SLURM", "disk"):
        assert re.search(rf"^  (ok|info)\s+{what}: ", r.stdout, re.M), (what, r.stdout)
    assert f"torch: {torch.__version__}" in r.stdout
    assert "auto -> cpu" in r.stdout or torch.cuda.is_available() is not False
    assert r.stdout.rstrip().endswith("ready: nothing here would stop the study")


def test_an_unreachable_tracking_server_is_named_with_how_to_start_one(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cfg = config_file(tmp_path, {"mlflow": {"tracking_uri": uri}})
    r = run_doctor("--configfile", cfg, "--directory", str(tmp_path))
    assert r.returncode == 1
    assert f"FAIL  MLflow: MLflow tracking server {uri} is not reachable" in r.stdout
    assert "make mlflow-server" in r.stdout and "mlflow server --host 127.0.0.1" in r.stdout


def test_an_unknown_device_keeps_its_config_error(tmp_path):
    r = run_doctor("--configfile", config_file(tmp_path, {"device": "tpu"}), "--directory", str(tmp_path))
    assert r.returncode == 1
    assert "FAIL  config:" in r.stdout and "config key device: 'tpu'" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CUDA device on a host without CUDA")
def test_cuda_on_a_host_without_it_fails_with_the_fix(tmp_path):
    checks = by_name(doctor.run_checks([config_file(tmp_path, {"device": "cuda"})], tmp_path))
    assert checks["device"].status == "FAIL" and "CUDA is not available" in checks["device"].detail


def test_portable_numerics_on_a_cpu_without_avx2_fails_with_native_as_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"sse4_2"})  # the host, not our logic, is faked
    checks = by_name(doctor.run_checks([], tmp_path))
    assert checks["numerics"].status == "FAIL" and "numerics: native" in checks["numerics"].fix
    native = by_name(doctor.run_checks([config_file(tmp_path, {"numerics": "native"})], tmp_path))
    assert native["numerics"].status == "info"


def test_too_little_disk_for_the_gradient_cache_fails(tmp_path, monkeypatch):
    cfg = config_file(tmp_path, {"similarity": {"source": "cache"}})
    estimate = by_name(doctor.run_checks([cfg], tmp_path))["disk"]
    assert estimate.status == "ok" and "gradient cache is estimated at" in estimate.detail
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    tight = by_name(doctor.run_checks([cfg], tmp_path))["disk"]
    assert tight.status == "FAIL" and "0.0 GB free" in tight.detail


def test_the_torch_line_names_the_build_cuda_and_gpu():
    r = run_doctor("--torch")
    assert r.returncode == 0
    line = r.stdout.strip()
    assert line.startswith(f"[tdabench] torch {torch.__version__} (")
    assert ("CUDA usable" in line) == torch.cuda.is_available() and "GPU" in line


def test_the_usage_block_lists_every_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        assert f"    tdabench {name} " in parser.description, name


def stamp_of(dry_run: str, venv: Path) -> Path:
    return Path(re.search(rf"touch ({re.escape(str(venv))}/\.torch-\d+)", dry_run).group(1))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_new_torch_spec_after_a_cpu_install_plans_a_torch_install(tmp_path):
    venv = tmp_path / "venv"

    def dry(*extra) -> str:
        r = subprocess.run(["make", "-n", "install", f"VENV={venv}", *extra], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    first = dry()
    assert re.search(r"pip install .*torch==2\.13\.0$", first, re.M)
    (venv / "bin").mkdir(parents=True)  # a completed CPU install: both stamps, newer than pyproject.toml
    stamp_of(first, venv).touch()
    (venv / ".installed").touch()
    assert "pip install" not in dry()  # nothing to do for the same spec
    gpu = dry("TORCH=torch==2.13.0 --index-url https://example.invalid/cu126")
    assert re.search(r"pip install .* torch==2\.13\.0 --index-url https://example\.invalid/cu126$", gpu, re.M)
    assert "pip show -q torch" in gpu and "--force-reinstall" in gpu  # replaces the CPU build already there
    assert '-e ".[dev,gguf]"' in gpu  # and the package again on top


@pytest.mark.parametrize(
    "text,message",
    [
        ("seed: 3\nseed: 4\n", "key 'seed' is given twice"),
        ("- 1\n- 2\n", "expected a mapping of config keys, got list"),
        ("seed: [1\n", "not valid YAML"),
    ],
)
def test_a_config_file_the_snakefile_would_refuse_fails_the_config_check(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = run_doctor("--configfile", str(path), "--directory", str(tmp_path))
    assert r.returncode == 1 and "FAIL  config:" in r.stdout and message in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
