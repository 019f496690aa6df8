"""Where two results folders part: each stage's outputs compared, in the order the study makes them.

    tdabench compare A B      (A, B: results folders, e.g. yours and a colleague's)

A study's numbers pass from stage to stage, so the first stage whose outputs differ is where two
runs parted; every later difference follows from it. Each stage's files are compared bit for bit
(tables column by column, models tensor by tensor, HDF5 stores dataset by dataset; timings,
checksums and other metadata left out) and a difference is sized: how many values differ and the
largest absolute difference. The runs' recorded environments (provenance.json: CPU, kernel level,
pins, threads, versions) are set side by side where they differ, as the likely cause.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

# Stages in DAG order: (name, glob patterns relative to a results folder). Derived files (plots,
# summary.md, costs.parquet: timings) are left out.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("data", ("data/background.parquet", "data/train.parquet", "data/queries.parquet")),
    ("base model", ("models/base/*", "models/converted/*", "models/pretrain_report.json")),
    ("fine-tuned model", ("models/finetuned/*", "models/finetune_report.json")),
    ("generated queries", ("data/queries_all.parquet",)),
    ("gradients", ("gradients/**/*.h5",)),
    ("similarity", ("similarity/*.h5",)),
    ("selection", ("selection/**/*.parquet",)),
    ("projection", ("projection/**/*.h5",)),
    ("metrics", ("evaluation/metrics.parquet", "evaluation/candidates.parquet", "evaluation/per_query.parquet")),
)
TIMING = ("seconds",)  # columns and JSON keys holding wall times, which never match


@dataclass
class Difference:
    """Values that differ in one file (or one part of it)."""

    where: str
    n_diff: int = 0  # values (or rows) that differ
    n_total: int = 0
    max_abs: float | None = None  # largest absolute difference of numeric values
    note: str = ""

    def __str__(self) -> str:
        size = f"{self.n_diff:,} of {self.n_total:,} values differ" if self.n_total else ""
        if self.max_abs is not None:
            size += f", max abs difference {self.max_abs:.3g}"
        return f"{self.where}: {', '.join(s for s in (size, self.note) if s)}"


@dataclass
class StageReport:
    stage: str
    files: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.differences


def _numeric(name: str, a: np.ndarray, b: np.ndarray) -> Difference | None:
    """Bitwise comparison of two arrays (NaN equals NaN); None when identical."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return Difference(name, note=f"shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
    if a.dtype.kind in "fc":
        differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    else:
        differ = a != b
    n = int(np.count_nonzero(differ))
    if n == 0:
        return None
    max_abs = None
    if a.dtype.kind in "fciu":
        with np.errstate(invalid="ignore"):
            gaps = np.abs(a.astype(np.float64)[differ] - b.astype(np.float64)[differ])
        max_abs = float(np.nanmax(gaps)) if np.isfinite(gaps).any() else float("nan")
    return Difference(name, n, int(a.size), max_abs)


def _parquet(rel: str, pa: Path, pb: Path) -> Iterator[Difference]:
    ta, tb = pl.read_parquet(pa), pl.read_parquet(pb)
    if ta.columns != tb.columns or ta.height != tb.height:
        yield Difference(rel, note=f"columns or row count differ ({ta.shape} vs {tb.shape})")
        return
    for c in ta.columns:
        if any(t in c for t in TIMING):
            continue
        if ta[c].dtype.is_numeric():
            found = _numeric(f"{rel} column {c}", ta[c].to_numpy(), tb[c].to_numpy())
        else:
            n = int(ta[c].ne_missing(tb[c]).sum())
            found = Difference(f"{rel} column {c}", n, ta.height) if n else None
        if found:
            yield found


def _h5(rel: str, pa: Path, pb: Path) -> Iterator[Difference]:
    import h5py

    with h5py.File(pa, "r") as fa, h5py.File(pb, "r") as fb:
        names_a, names_b = [], []
        fa.visititems(lambda n, o: names_a.append(n) if isinstance(o, h5py.Dataset) else None)
        fb.visititems(lambda n, o: names_b.append(n) if isinstance(o, h5py.Dataset) else None)
        if sorted(names_a) != sorted(names_b):
            only = sorted(set(names_a) ^ set(names_b))
            yield Difference(rel, note=f"datasets differ: {only[:5]}")
            return
        for name in sorted(names_a):
            if name.rsplit("/", 1)[-1] in TIMING:  # (a kept block's projection time)
                continue
            found = _numeric(f"{rel} {name}", np.asarray(fa[name][()]), np.asarray(fb[name][()]))
            if found:
                yield found


def _safetensors(rel: str, pa: Path, pb: Path) -> Iterator[Difference]:
    from safetensors.numpy import load_file

    ta, tb = load_file(pa), load_file(pb)
    if sorted(ta) != sorted(tb):
        yield Difference(rel, note=f"tensors differ: {sorted(set(ta) ^ set(tb))[:5]}")
        return
    found = [d for name in sorted(ta) if (d := _numeric(name, ta[name], tb[name])) is not None]
    if found:
        worst = max(found, key=lambda d: d.max_abs or 0.0)
        yield Difference(
            rel,
            sum(d.n_diff for d in found),
            sum(v.size for v in ta.values()),
            worst.max_abs,
            f"{len(found)} of {len(ta)} tensors, the largest difference in {worst.where}",
        )


def _drop_timing(obj):
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [_drop_timing(v) for v in obj]
    return obj


def _json(rel: str, pa: Path, pb: Path) -> Iterator[Difference]:
    a, b = (_drop_timing(json.loads(p.read_text())) for p in (pa, pb))
    if a != b:
        yield Difference(rel, note="contents differ")


def compare_file(rel: str, pa: Path, pb: Path) -> list[Difference]:
    if not pa.exists() or not pb.exists():
        return [Difference(rel, note=f"only in {'A' if pa.exists() else 'B'}")]
    suffix = pa.suffix
    if suffix == ".parquet":
        return list(_parquet(rel, pa, pb))
    if suffix == ".h5":
        return list(_h5(rel, pa, pb))
    if suffix == ".safetensors":
        return list(_safetensors(rel, pa, pb))
    if suffix == ".json":
        return list(_json(rel, pa, pb))
    return [] if pa.read_bytes() == pb.read_bytes() else [Difference(rel, note="bytes differ")]


def _files(root: Path, patterns: tuple[str, ...]) -> set[str]:
    return {str(p.relative_to(root)) for pattern in patterns for p in root.glob(pattern) if p.is_file()}


def compare_stages(a: str | Path, b: str | Path) -> list[StageReport]:
    """One report per stage that either folder has outputs of, in DAG order."""
    a, b = Path(a), Path(b)
    reports = []
    for stage, patterns in STAGES:
        files = sorted(_files(a, patterns) | _files(b, patterns))
        if not files:
            continue
        report = StageReport(stage, len(files))
        for rel in files:
            report.differences += compare_file(rel, a / rel, b / rel)
        reports.append(report)
    return reports


def environment_differences(a: str | Path, b: str | Path) -> list[str]:
    """'key: A vs B' for the recorded environments (provenance.json) where the runs differ:
    the summary host's, then each job's that both runs recorded."""

    def load(root: Path) -> dict:
        path = root / "provenance.json"
        return json.loads(path.read_text()) if path.exists() else {}

    pa, pb = load(Path(a)), load(Path(b))
    out = []
    for key in ("numerics", "commit", "code_digest", "config_hash"):
        if pa.get(key) != pb.get(key):
            out.append(f"{key}: {pa.get(key)} vs {pb.get(key)}")
    ea, eb = pa.get("environment", {}), pb.get("environment", {})
    ea, eb = _flat(ea), _flat(eb)
    keys = sorted((set(ea) | set(eb)) - {"numerics"})  # (numerics: listed above)
    out += [f"{k}: {ea.get(k)} vs {eb.get(k)}" for k in keys if ea.get(k) != eb.get(k)]
    ja, jb = pa.get("jobs", {}), pb.get("jobs", {})
    for job in sorted(set(ja) & set(jb)):
        a, b = _flat(ja[job]), _flat(jb[job])
        for k in sorted(set(a) | set(b)):
            if k.split(".")[0] in JOB_KEYS and a.get(k) != b.get(k):
                out.append(f"job {job} {k}: {a.get(k)} vs {b.get(k)}")
    return out


# What a job's environment record holds that can explain a difference (not where or when it ran).
JOB_KEYS = ("numerics", "cpu_model", "kernel_level", "env", "threads", "token_multiple", "gpu", "torch", "mkl")


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def first_difference(reports: list[StageReport]) -> StageReport | None:
    return next((r for r in reports if not r.same), None)
