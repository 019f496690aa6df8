"""Project wiring: conda env in step with pyproject, README quick start, CI entry, cache budget."""

import math
import re
import tomllib
from pathlib import Path

import yaml

from tdabench.components import match_components, tiny_llama_shapes
from tdabench.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_conda_env_lists_exactly_the_pyproject_dependencies():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "tdabench.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps)


def test_stage_modules_read_files_only_through_their_owners():
    """No stage opens a cached file by hand: no h5py, no parquet reading, no name slicing."""
    for path in (REPO / "src" / "tdabench" / "pipeline").glob("*.py"):
        text = path.read_text()
        assert "import h5py" not in text and "read_parquet" not in text, path.name


def test_schema_ships_inside_the_package(tmp_path):
    """A wheel (a non-editable install) carries the schema; built from a copy, so no build/ here."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(src),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    wheel = next(tmp_path.glob("tdabench-*.whl"))
    assert "tdabench/schemas/config.schema.yaml" in zipfile.ZipFile(wheel).namelist()


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_default_gradient_cache_fits_in_one_gigabyte():
    cfg = load_config(REPO / "config" / "config.yaml")
    shapes = tiny_llama_shapes(**cfg["model"]["tiny"])
    names = match_components(list(shapes), cfg["gradients"]["components"])
    dim = sum(math.prod(shapes[n]) for n in names)
    syn = cfg["dataset"]["synthetic"]
    n_train = syn["n_entities"] * syn["background_facts_per_entity"] + syn["planted_facts"]
    n_queries = syn["planted_facts"] * len(cfg["dataset"]["settings"])
    itemsize = {"float32": 4, "float16": 2}[cfg["gradients"]["dtype"]]
    assert (n_train + n_queries) * dim * itemsize < 1e9
