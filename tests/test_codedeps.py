from pathlib import Path

from tdabench.codedeps import stage_sources


def names(stage):
    return {
        Path(p).relative_to(Path(p).parents[1]).as_posix() if "pipeline" in p else Path(p).name
        for p in stage_sources(f"tdabench.pipeline.{stage}")
    }


def test_gradient_stage_depends_on_its_modules_and_not_on_logging_or_analysis():
    deps = names("gradients")
    assert {
        "gradients.py",
        "components.py",
        "models.py",
        "store.py",
        "pipeline/gradients.py",
        "pipeline/common.py",
    } <= deps
    assert "tracking.py" not in deps
    assert not {"selection.py", "similarity.py", "evaluate.py", "data"} & deps


def test_dataset_stage_does_not_depend_on_model_code():
    deps = names("dataset")
    assert "synthetic.py" in deps
    assert not {"gradients.py", "models.py", "train.py"} & deps


def test_transitive_imports_are_followed():
    deps = names("evaluate")  # pipeline.evaluate -> evaluate -> metrics, similarity -> store -> io
    assert {"evaluate.py", "metrics.py", "similarity.py", "store.py", "io.py", "components.py"} <= deps
