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


def test_every_rule_uses_the_conda_env_and_heavy_rules_log_and_benchmark():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"\nrule ", "\n" + text)[1:]:
            name = rule.split(":")[0]
            assert 'conda:\n        "../../envs/tdabench.yaml"' in rule, name
            assert "log:" in rule and "resources:" in rule and "threads:" in rule, name
            if name != "summary":
                assert "benchmark:" in rule, name


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
