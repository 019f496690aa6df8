"""`tdabench doctor`: what a study will run on here, and what would make it fail, before it runs.

Each check gives one line: `ok`, `info` (worth knowing, nothing fails) or `FAIL` with the fix. The
command exits 1 when any check fails. It reads the study's config the way the Snakefile does
(config/config.yaml, then each --configfile over it) and imports torch, but no model or MLflow,
so it answers in seconds.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from tdabench import numerics, plan, resources, tracking
from tdabench.config import ConfigError, deep_merge, read_config_file, validate_config

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"  # a source checkout's
SLURM_PLUGIN = "snakemake-executor-plugin-slurm"


@dataclass
class Check:
    status: str  # ok | info | FAIL
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"  {self.status:<5} {self.what}: " + self.detail.replace("\n", "\n        ")
        return text + (f"\n        fix: {self.fix}" if self.fix else "")


def study_config(configfiles: list[str], workdir: Path) -> dict:
    """The validated config: the workdir's config/config.yaml (else the checkout's, else the schema's
    defaults), then each file over it, as Snakemake merges --configfile."""
    bases = [p for p in (workdir / "config" / "config.yaml", REPO_CONFIG) if p.is_file()][:1]
    merged: dict = {}
    for path in [*bases, *map(Path, configfiles)]:
        merged = deep_merge(merged, read_config_file(path))
    return validate_config(merged)


def torch_line() -> str:
    """One line: torch's build, whether CUDA is usable, the GPU (what `make install` ends with)."""
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        gpu = f"CUDA usable, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"
    elif torch.version.cuda:
        gpu = "CUDA not usable (no GPU or driver visible here), GPU: none"
    else:
        gpu = "CUDA not usable (CPU build), GPU: none"
    return f"torch {torch.__version__} ({build}), {gpu}"


def check_torch() -> Check:
    return Check("ok", "torch", torch_line().removeprefix("torch "))


def check_device(config: dict) -> Check:
    from tdabench.device import DeviceError, describe, resolve_device

    spec = config["device"]
    try:
        device = resolve_device(spec)
    except DeviceError as e:
        return Check("FAIL", "device", str(e), "run doctor where the jobs run (a GPU node) or set device: auto")
    return Check("ok", "device", f"{spec} -> {describe(device)} for the model jobs run on this host")


def check_numerics(config: dict) -> Check:
    mode = config["numerics"]
    try:
        numerics.check_host(mode)
    except numerics.NumericsError as e:
        return Check("FAIL", "numerics", str(e), "set numerics: native in the study's config")
    if mode == "native":
        return Check("info", "numerics", f"native: this CPU's own kernels ({numerics.cpu_model()}), no pins")
    pins = ", ".join(f"{k}={v}" for k, v in {**numerics.CPU_PINS, **numerics.CUDA_PINS}.items())
    shim = ""
    if numerics.needs_vendor_shim():
        try:
            shim = f"; MKL's vendor shim preloaded: {numerics.mkl_vendor_shim()}"
        except numerics.NumericsError as e:
            return Check("FAIL", "numerics", str(e), "install a C compiler, or set numerics: native")
    return Check("ok", "numerics", f"portable: jobs pin {pins} on {numerics.cpu_model()} (AVX2: yes){shim}")


def check_mlflow(config: dict, workdir: Path) -> Check:
    mlcfg = config["mlflow"]
    if not mlcfg["enabled"]:
        return Check("info", "MLflow", "mlflow.enabled is false: no runs are recorded")
    uri = mlcfg["tracking_uri"] or tracking.default_tracking_uri(workdir)
    problem = tracking.store_problem(uri, workdir)
    if problem is None:
        kind = "server answers" if tracking.is_server(uri) else "store is writable"
        return Check("ok", "MLflow", f"{uri}: {kind}")
    if tracking.is_server(uri):
        fix = (
            "start it (`make mlflow-server`, or `mlflow server --host 127.0.0.1 --port 5000`), or set "
            "mlflow.tracking_uri to null for the sqlite store in the workdir; a study run now records its "
            "runs and `tdabench log` logs them later"
        )
    else:
        fix = "make the folder writable or set mlflow.tracking_uri"
    return Check("FAIL", "MLflow", problem, fix)


def check_slurm() -> Check:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        needed = "needed for profiles/slurm: pip install -e '.[slurm]'"
        return Check("info", "SLURM", f"{SLURM_PLUGIN} not installed ({needed})")
    version = importlib.metadata.version(SLURM_PLUGIN)
    where = "sbatch on PATH" if shutil.which("sbatch") else "no sbatch on this host (local runs only)"
    return Check("ok" if shutil.which("sbatch") else "info", "SLURM", f"{SLURM_PLUGIN} {version}; {where}")


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_disk(config: dict, workdir: Path) -> Check:
    """Free space where results/ lives against the gradient cache still to write (an upper bound)."""
    results = workdir / "results"
    probe = results if results.exists() else workdir
    free = shutil.disk_usage(probe).free
    source = plan.similarity_source(config)
    if source != "cache":
        return Check("ok", "disk", f"{free / 1e9:.1f} GB free under {results}; gradients are streamed (no cache)")
    n = resources.table_rows(workdir / "results/data/train.parquet", config)
    n += resources.table_rows(workdir / plan.query_table(config), config)
    estimate = resources.cache_bytes(config, n)
    there = _bytes_under(workdir / "results" / "gradients")
    need = max(0, estimate - there)
    detail = (
        f"{free / 1e9:.1f} GB free under {results}; the gradient cache is estimated at {estimate / 1e9:.2f} GB "
        f"({there / 1e9:.2f} GB written)"
    )
    if need > free:
        fix = "free space, or stream instead of caching (similarity.source: stream)"
        return Check("FAIL", "disk", detail, fix)
    return Check("ok", "disk", detail)


def run_checks(configfiles: list[str], workdir: str | Path = ".") -> list[Check]:
    """Every check; a config that does not validate is one FAIL (the rest need it)."""
    workdir = Path(workdir).resolve()
    checks = [check_torch()]
    try:
        config = study_config([str(Path(f).resolve()) for f in configfiles], workdir)
    except ConfigError as e:
        return [*checks, Check("FAIL", "config", str(e), "fix the key it names (`tdabench config` prints every key)")]
    checks.append(Check("ok", "config", f"valid ({', '.join(configfiles) or 'config/config.yaml'})"))
    with contextlib.chdir(workdir):  # the plan's paths are relative to the workdir, as in a job
        checks += [
            check_device(config),
            check_numerics(config),
            check_mlflow(config, workdir),
            check_slurm(),
            check_disk(config, workdir),
        ]
    return checks
