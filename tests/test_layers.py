"""The dev wing (tdabench.dev: benchmarks, peers, the architecture sweep, the README renderer) sits
on top of the library, never under it: no library module, workflow script or stage imports it, so
editing a benchmark never changes a stage's code digest nor reruns a rule."""

import ast
import re
from pathlib import Path

from tdabench import codedeps
from tdabench.contracts import CONTRACTS

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "tdabench"
DEV = SRC / "dev"


def imported(path: Path, package: str) -> set[str]:
    """Every module `path` imports (relative imports resolved against `package`), with
    `from a import b` counted as both `a` and `a.b` (b may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def dev_imports(path: Path, package: str) -> set[str]:
    return {m for m in imported(path, package) if m == "tdabench.dev" or m.startswith("tdabench.dev.")}


def package_of(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


def test_no_library_module_imports_the_dev_wing():
    library = [p for p in SRC.rglob("*.py") if DEV not in p.parents]
    assert len(library) > 30
    offenders = {p.relative_to(SRC).as_posix(): dev_imports(p, package_of(p)) for p in library}
    assert not {k: v for k, v in offenders.items() if v}
    # the parser does see such imports (the wing's own modules have them)
    assert dev_imports(DEV / "bench" / "gradients.py", "tdabench.dev.bench")


def test_the_workflow_does_not_import_the_dev_wing():
    for path in (REPO / "workflow" / "scripts").glob("*.py"):
        assert not dev_imports(path, ""), path.name
    for path in [REPO / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]:
        assert not re.search(r"tdabench\.dev\b|from tdabench import .*\bdev\b", path.read_text()), path.name


def test_no_stage_runs_a_dev_file():
    for rule, contract in CONTRACTS.items():
        sources = [Path(p).relative_to(codedeps.SRC) for p in codedeps.stage_sources(contract.module)]
        assert sources, rule
        assert not [p for p in sources if p.parts[0] == "dev"], rule
