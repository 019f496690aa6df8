"""Same numbers on any machine (numerics: portable): a study with the default model sizes run at
--cores 1 and at --cores 2, with torch's kernel level forced differently through the environment
(and MKL's and polars' thread settings), gives bitwise-identical outputs at every stage; a changed
difference is named by `tdabench compare` as the stage where two runs part."""

import json
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
    "projection": {"methods": ["sjlt", "select_then_project"], "dims": [16, 64], "seeds": [0]},
    "evaluation": {"cost_samples": 4, "bootstrap": 100},
    "mlflow": {"enabled": False},
}
pytestmark = [pytest.mark.workflow, pytest.mark.long]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The study at --cores 1 and at --cores 2, side by side (their numbers must not care)."""
    runs = []
    for cores, env in (
        (1, {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "POLARS_MAX_THREADS": "1"}),
        (2, {"ATEN_CPU_CAPABILITY": "avx2", "POLARS_MAX_THREADS": "2"}),
    ):
        root = copy_repo(tmp_path_factory.mktemp(f"cores{cores}"))
        write_config(root, STUDY)
        process = subprocess.Popen(
            [SNAKEMAKE, "--cores", str(cores)],
            cwd=root,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs.append((root, process))
    for _, process in runs:
        out, _ = process.communicate(timeout=1200)
        assert process.returncode == 0, out[-5000:]
    return [root for root, _ in runs]


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
    result = subprocess.run([CLI, "compare", str(one), str(two)], capture_output=True, text=True)
    assert result.returncode == 0 and "same numbers" in result.stdout, result.stdout
    # What each job ran with is recorded: the forced kernel level was overridden by the pins.
    assert "job finetune threads: 1 vs 2" in result.stdout and "kernel_level" not in result.stdout
    provenance = json.loads((one / "provenance.json").read_text())
    assert provenance["numerics"] == "portable"
    assert {job["kernel_level"] for job in provenance["jobs"].values()} == {"AVX2"}
    assert provenance["jobs"]["finetune"]["token_multiple"] == 8


def test_compare_names_the_stage_where_two_runs_part(two_runs, tmp_path):
    """One weight of the fine-tuned model moved in a copy of a run: compare names that stage first
    (the data and the base model the same), with the size of the difference."""
    from safetensors.numpy import load_file, save_file

    source = two_runs[1] / "results"
    changed = tmp_path / "results"
    shutil.copytree(source, changed)
    path = changed / "models" / "finetuned" / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name].flat[0] += 2**-7
    save_file(tensors, str(path), metadata={"format": "pt"})
    result = subprocess.run([CLI, "compare", str(source), str(changed)], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1
    assert "data: same, 3 file(s)" in lines and any(line.startswith("base model: same") for line in lines)
    assert lines[-1].startswith("first difference: fine-tuned model (models/finetuned/model.safetensors: 1 of ")
    assert f"max abs difference {2**-7:.3g}" in lines[-1] and name in lines[-1]
