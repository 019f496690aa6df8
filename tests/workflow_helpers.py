"""Running the workflow in a temporary copy of the repository (shared by the workflow tests)."""

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
COPIED = ["Snakefile", "workflow", "config", "src", "envs", "profiles"]


def copy_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, root / name)
    return root


def snakemake(cwd, *args, check=True):
    result = subprocess.run([SNAKEMAKE, "--cores", "2", *args], cwd=cwd, capture_output=True, text=True, timeout=1200)
    if check and result.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints: {rule: count}; {} when nothing is to be done."""
    if "Job stats:" not in output:
        return {}
    block = output.split("Job stats:", 1)[1].splitlines()
    stats = {}
    for line in block[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        stats[parts[0]] = int(parts[1])
    return stats


def planned(cwd, *args) -> dict[str, int]:
    r = snakemake(cwd, "-n", *args)
    return job_stats(r.stdout + r.stderr)


def write_config(root, cfg):
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(backend_uri: str, log_path: Path, artifacts: Path | None = None, port: int | None = None):
    """A real `mlflow server` on 127.0.0.1 (`port`, or a free one) until the block ends; yields its
    URL. Its own process group, so its workers (uvicorn, huey consumers) are stopped with it."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{Path(log_path).read_text()}") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
        try:  # workers that outlived the main process
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    try:  # nothing of the server is left running
        os.killpg(server.pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"processes of the mlflow server (group {server.pid}) are still running")


@contextmanager
def half_open_server(port: int):
    """An HTTP server on 127.0.0.1:`port` that answers `/health` and never answers anything else:
    a tracking server that is up but overloaded or half broken."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                release.wait()

        do_POST = do_PATCH = do_DELETE = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
