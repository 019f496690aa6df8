"""The floors of docs/design.md: every module listed once, imports only down or sideways, no
cycles. The dev wing (tdabench.dev: benchmarks, peers, the architecture sweep, the README renderer)
sits on top of the library, never under it: no library module, workflow script or stage imports
it, so editing a benchmark never changes a stage's code digest nor reruns a rule."""

import re
from pathlib import Path

from tdabench import codedeps
from tdabench.contracts import CONTRACTS

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "tdabench"
DEV = SRC / "dev"


def dev_imports(path: Path, module: str) -> set[str]:
    return {m for m in codedeps.module_imports(path, module) if m == "tdabench.dev" or m.startswith("tdabench.dev.")}


def test_no_library_module_imports_the_dev_wing():
    library = [p for p in SRC.rglob("*.py") if DEV not in p.parents]
    assert len(library) > 30
    offenders = {p.relative_to(SRC).as_posix(): dev_imports(p, module_name(p)) for p in library}
    assert not {k: v for k, v in offenders.items() if v}
    # the parser does see such imports (the wing's own modules have them)
    assert dev_imports(DEV / "bench" / "gradients.py", "tdabench.dev.bench.gradients")


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


def design_floors() -> dict[str, int]:
    """docs/design.md's floor table: {module path or glob (e.g. 'pipeline/*.py'): floor}."""
    text = (REPO / "docs" / "design.md").read_text().split("## Floors", 1)[1].split("\n## ", 1)[0]
    return {m: int(f) for f, m in re.findall(r"^\| (\d+) \| `([^`]+)` \|", text, re.M)}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if path.name == "__init__.py" else rel.parts)


def library_modules() -> dict[str, Path]:
    """tdabench's modules (package __init__ files aside): {dotted name: path}."""
    return {module_name(p): p for p in SRC.rglob("*.py") if p.name != "__init__.py"}


def floor_of(name: str, floors: dict[str, int]) -> int | None:
    path = name.removeprefix("tdabench.").replace(".", "/") + ".py"
    for pattern, floor in floors.items():
        if path == pattern or (pattern.endswith("*.py") and path.startswith(pattern[:-4]) and path != pattern):
            return floor
    return None


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {
        name: {m for m in codedeps.module_imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_every_module_sits_on_one_floor_of_the_design():
    floors = design_floors()
    assert len(floors) > 30
    unlisted = [m for m in library_modules() if floor_of(m, floors) is None]
    assert not unlisted, f"modules missing from docs/design.md's floor table: {unlisted}"
    listed = [p for p in floors if "*" not in p]
    gone = [p for p in listed if not (SRC / p).exists()]
    assert not gone, f"docs/design.md lists modules that do not exist: {gone}"


def test_imports_never_point_to_a_higher_floor():
    floors, graph = design_floors(), import_graph()
    up = [
        f"{a} (floor {floor_of(a, floors)}) imports {b} (floor {floor_of(b, floors)})"
        for a, deps in graph.items()
        for b in deps
        if floor_of(b, floors) > floor_of(a, floors)
    ]
    assert not up, "\n".join(up)


def test_the_import_graph_has_no_cycle():
    from graphlib import TopologicalSorter

    TopologicalSorter(import_graph()).prepare()  # raises CycleError naming the cycle
