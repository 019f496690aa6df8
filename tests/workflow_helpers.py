"""Running the workflow in a temporary copy of the repository (shared by the workflow tests)."""

import shutil
import subprocess
import sys
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
