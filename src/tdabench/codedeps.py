"""Which source files a pipeline stage runs: the stage module plus every tdabench module it
imports, transitively (read with `ast`, nothing is imported).

Rules list these files as a named input, so editing a module reruns exactly the rules whose
results can depend on it. `tdabench.tracking` is left out: it only logs, never changes a result.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "tdabench"
SRC = Path(__file__).resolve().parent
NOT_RESULTS = {"tdabench.tracking", "tdabench"}  # logging; the package __init__ holds no logic


def module_file(module: str, src: Path = SRC) -> Path:
    rel = Path(*module.split(".")[1:])
    pkg = src / rel / "__init__.py"
    return pkg if pkg.exists() else (src / rel).with_suffix(".py")


def module_imports(path: Path, module: str) -> set[str]:
    """The tdabench modules the file `path` (module `module`) imports, anywhere in it, relative
    imports resolved; `from pkg import name` counts as `pkg` and `pkg.name` (name may be a module)."""
    stat = path.stat()  # parsed once per version of the file (the Snakefile asks for every rule)
    return set(_imports(str(path), module, stat.st_mtime_ns, stat.st_size))


@cache
def _imports(path: str, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    tree = ast.parse(Path(path).read_text(), filename=path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return frozenset(m for m in found if m == PACKAGE or m.startswith(PACKAGE + "."))


@cache
def _closure(module: str, src: Path) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen or not module_file(mod, src).exists():
            continue
        seen.add(mod)
        todo.extend(module_imports(module_file(mod, src), mod))
    return tuple(sorted(seen))


def stage_sources(module: str, src: str | Path = SRC) -> list[str]:
    """Source files `module` depends on (absolute paths, sorted), without logging-only modules."""
    src = Path(src).resolve()
    return [str(module_file(m, src)) for m in _closure(module, src) if m not in NOT_RESULTS]


def sources_digest(module: str) -> str:
    """Short hash of the sources `module` runs: stamps caches so a code change is never resumed into."""
    digest = hashlib.sha256()
    for path in stage_sources(module):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def study_digest(modules: list[str], src: str | Path = SRC) -> str:
    """Short hash of every source file the given stage modules run: what a study's numbers depend
    on (recorded with its results; the README flags a block whose digest is not this checkout's)."""
    files = sorted({f for m in modules for f in stage_sources(m, src)})
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).relative_to(Path(src).resolve()).as_posix().encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]
