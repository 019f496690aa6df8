"""Same numbers on any machine (numerics: portable): a study with the default model sizes run at
--cores 1 and at --cores 2, with torch's kernel level forced differently through the environment
(and MKL's and polars' thread settings), gives bitwise-identical outputs at every stage; a changed
setting is named by `tdabench compare` as the stage where two runs part."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tdabench.compare import compare_stages, first_difference

from workflow_helpers import SNAKEMAKE, copy_repo, write_config

CLI = str(Path(sys.executable).with_name("tdabench"))
# The default model (model.tiny left at its defaults), on little data for a few epochs.
STUDY = {
    "dataset": {
        "synthetic": {"n_entities": 10, "background_facts_per_entity": 2, "planted_facts": 16},
        "generate_max_tokens": 12,
    },
    "pretrain": {"epochs": 3, "batch_size": 8},
    "finetune": {"epochs": 3, "batch_size": 8},
    "gradients": {"batch_size": 8},
    "selection": {"n_splits": 2},
    "projection": {"dims": [16, 64], "seeds": [0]},
    "evaluation": {"cost_samples": 4, "bootstrap": 50},
    "mlflow": {"enabled": False},
}
pytestmark = pytest.mark.workflow


def run_study(root: Path, cores: int, env: dict, *args: str) -> None:
    result = subprocess.run(
        [SNAKEMAKE, "--cores", str(cores), *args],
        cwd=root,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    roots = []
    for cores, env in (
        (1, {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "POLARS_MAX_THREADS": "1"}),
        (2, {"ATEN_CPU_CAPABILITY": "avx2", "POLARS_MAX_THREADS": "2"}),
    ):
        root = copy_repo(tmp_path_factory.mktemp(f"cores{cores}"))
        write_config(root, STUDY)
        run_study(root, cores, env)
        roots.append(root)
    return roots


def test_one_and_two_cores_on_other_kernel_levels_give_bitwise_identical_outputs(two_runs):
    one, two = (root / "results" for root in two_runs)
    reports = compare_stages(one, two)
    stages = [r.stage for r in reports]
    assert stages == [
        "data",
        "base model",
        "fine-tuned model",
        "generated queries",
        "gradients",
        "similarity",
        "selection",
        "projection",
        "metrics",
    ]
    assert all(r.files for r in reports)
    assert first_difference(reports) is None, [str(d) for r in reports for d in r.differences][:10]
    # What each job ran with is recorded: the forced kernel level was overridden by the pins.
    result = subprocess.run([CLI, "compare", str(one), str(two)], capture_output=True, text=True)
    assert result.returncode == 0 and "same numbers" in result.stdout, result.stdout
    assert "job finetune threads: 1 vs 2" in result.stdout


def test_compare_names_the_stage_where_a_changed_setting_parts_two_runs(two_runs, tmp_path):
    source = two_runs[1]
    changed = tmp_path / "changed"
    shutil.copytree(source, changed, symlinks=True)
    run_study(changed, 2, {}, "--config", "finetune={epochs: 4}")  # reruns fine-tuning and what follows
    result = subprocess.run([CLI, "compare", str(source / "results"), str(changed / "results")], capture_output=True)
    out = result.stdout.decode()
    assert result.returncode == 1
    assert "data: same" in out and "base model: same" in out and "fine-tuned model: DIFFERS" in out
    assert out.strip().splitlines()[-1].startswith("first difference: fine-tuned model")
