"""Every causal-LM architecture transformers knows, built tiny: per-sample gradients of every
component are exact vs the bs=1 loop, or refused by the self-check — never wrong, never a crash.
About a minute on two cores (one process per core); `make test-fast` skips it."""

import re
from pathlib import Path

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tdabench.dev.bench.architectures import check_all

pytestmark = pytest.mark.architectures
DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


@pytest.fixture(scope="module")
def results():
    return {r.model_type: r for r in check_all(list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), jobs=2)}


def test_every_built_architecture_is_exact_or_refused(results):
    bad = {
        t: f"{r.status}: {r.reason}" for t, r in results.items() if r.status not in ("exact", "refused", "not built")
    }
    assert not bad, bad
    for r in results.values():
        if r.status == "exact":
            assert r.worst_error <= 1e-4 and r.n_components > 0
        if r.status == "refused":
            assert "self-check" in r.reason or "disagree" in r.reason


def test_at_least_90_percent_of_the_mapping_is_built(results):
    built = [t for t, r in results.items() if r.built]
    assert len(built) >= 0.9 * len(results), {t: r.reason for t, r in results.items() if not r.built}


def test_docs_table_is_what_the_command_produces(results):
    text = DOC.read_text()
    version = re.search(r"transformers (\S+),", text).group(1)
    if version != transformers.__version__:
        pytest.skip(
            f"{DOC.name} is for transformers {version}, this is {transformers.__version__}: "
            "regenerate with python -m tdabench.dev.bench architectures --output docs/architectures.md"
        )
    rows = dict(re.findall(r"^\| (\S+) \| \S+ \| (exact|refused|wrong|error|not built) \|", text, re.M))
    assert rows == {t: r.status for t, r in results.items()}
