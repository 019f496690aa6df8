"""The results manifest: every result file, its content hash and the rule that wrote it.

Each workflow job records its outputs when it ends (`logs/outputs/<job>.json`: path, bytes,
sha256); the summary job, which runs after every other job of the study, gathers the records of
the files still there into `results/manifest.json`, with the config files the study ran with.
`tdabench verify` then finds a result file that is missing or whose bytes are neither those in
the manifest nor those its rule wrote when it last ran (a table edited by hand, a store deleted),
and names the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tdabench.integrity import rebuild_hint, study_configfiles
from tdabench.io import write_json

FORMAT = "tdabench-manifest/1"
OUTPUTS_DIR = "logs/outputs"  # one record per job: what it wrote
NAME = "manifest.json"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_files(outputs: Iterable) -> list[Path]:
    """The files of a job's outputs (a folder output: every file in it; a named list of outputs:
    each of them)."""
    files = []
    for out in outputs:
        if not isinstance(out, (str, Path)):
            files += output_files(out)
            continue
        p = Path(out)
        # hidden files: Snakemake's own (.snakemake_timestamp of a folder output), touched after the job
        files += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return files


def describe(files: Iterable[Path]) -> dict[str, dict]:
    return {str(f): {"bytes": f.stat().st_size, "sha256": file_digest(f)} for f in files}


def record_outputs(job: str, rule: str, wildcards: dict, outputs: Iterable[str | Path], folder=OUTPUTS_DIR) -> None:
    """What job `job` wrote (called when it ends): the summary's manifest is built from these."""
    record = {"job": job, "rule": rule, "wildcards": wildcards, "files": describe(output_files(outputs))}
    write_json(record, Path(folder) / f"{job}.json")


def recorded_outputs(folder: str | Path = OUTPUTS_DIR) -> dict[str, dict]:
    """{path: {bytes, sha256, rule, job}} from the jobs' output records; when two jobs wrote one
    path (a store rebuilt by another rule), the last writer's entry stands."""
    files: dict[str, dict] = {}
    for path in sorted(Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime_ns):  # oldest first
        record = json.loads(path.read_text())
        for name, entry in record["files"].items():
            files[name] = {**entry, "rule": record["rule"], "job": record["job"]}
    return files


def build_manifest(own: dict[str, Iterable[str | Path]], folder=OUTPUTS_DIR, results="results") -> dict:
    """The manifest of `results`: every recorded file still there, plus `own` ({rule: files}:
    the calling job's outputs, written just now)."""
    files = {
        name: entry
        for name, entry in recorded_outputs(folder).items()
        if Path(name).exists() and Path(name).is_relative_to(results)
    }
    for rule, paths in own.items():
        for name, entry in describe(output_files(paths)).items():
            files[name] = {**entry, "rule": rule, "job": rule}
    return {"format": FORMAT, "configfiles": study_configfiles(), "files": dict(sorted(files.items()))}


def write_manifest(manifest: dict, path: str | Path) -> None:
    write_json(manifest, path)


def check_manifest(results: str | Path) -> tuple[int, list[tuple[Path, str]]]:
    """(files listed, [(file, problem)]): each file of `results`/manifest.json must be there with
    the bytes its job wrote. Paths in the manifest are relative to the study's workdir (results'
    parent)."""
    results = Path(results)
    manifest = json.loads((results / NAME).read_text())
    if manifest.get("format") != FORMAT:
        return 0, [(results / NAME, f"{results / NAME}: not a {FORMAT} file")]
    workdir, problems = results.parent, []
    later = recorded_outputs(workdir / OUTPUTS_DIR)
    for name, entry in manifest["files"].items():
        path = workdir / name
        hint = rebuild_hint(name, manifest.get("configfiles"))
        if not path.exists():
            problems.append((path, f"{name}: missing (written by rule {entry['rule']}); {hint}"))
            continue
        digest = file_digest(path)
        if digest == entry["sha256"]:
            continue
        newer = later.get(name)  # rebuilt by its rule since the summary ran: its bytes are those
        if newer is None or digest != newer["sha256"]:
            problems.append((path, f"{name}: its bytes changed since rule {entry['rule']} wrote it; {hint}"))
    return len(manifest["files"]), problems
