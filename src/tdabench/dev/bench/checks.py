"""`bench checks`: what the integrity checks cost on the files of a finished default study."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def run(args) -> None:
    """What the integrity checks of a finished default study cost, measured on its files: the
    read-back seal every HDF5 writer does, the checksum + finiteness pass of every job that reads
    a gradient store, the similarity and projection validation, against the jobs' own time."""
    import shutil

    import polars as pl
    import yaml

    from tdabench.config import validate_config
    from tdabench.integrity import RunningCheck, open_hdf5, seal_hdf5, verify_hdf5
    from tdabench.similarity import load_similarity, validate_similarity

    results = Path(args.results)
    cfg = validate_config(yaml.safe_load((results / "config.yaml").read_text()))
    settings, methods = cfg["dataset"]["settings"], cfg["projection"]["methods"]
    stp = "select_then_project" in methods
    readers = len(settings) + len([m for m in methods if m != "select_then_project"]) + (len(settings) if stp else 0)
    timings = {}

    def timed(name, fn, repeat=1):
        start = time.perf_counter()
        fn()
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * repeat

    h5 = sorted(p for p in results.rglob("*.h5") if not p.name.startswith("."))
    with tempfile.TemporaryDirectory() as tmp:
        for p in h5:  # what each writer adds before its rename
            copy = Path(tmp) / p.name
            shutil.copy2(p, copy)
            timed("seal (read back, finite, checksums, fsync) of every .h5", lambda c=copy: seal_hdf5(c))
    for p in sorted(results.glob("gradients/*/*.h5")):

        def one_pass(p=p):
            with open_hdf5(p) as f:
                for name in f["grads"]:
                    check = RunningCheck(p, f, f"grads/{name}")
                    check.feed(f["grads"][name][:])
                    check.finish()

        def read_only(p=p):
            with open_hdf5(p) as f:
                for name in f["grads"]:
                    f["grads"][name][:]

        start = time.perf_counter()
        read_only()
        plain = time.perf_counter() - start
        timed(f"checksum + finite pass of gradient stores, x{readers} reader jobs", one_pass, readers)
        timings[f"checksum + finite pass of gradient stores, x{readers} reader jobs"] -= plain * readers
    # Similarity stores and projection files are checked as they are read; timing a whole
    # verify_hdf5 pass (an extra read) for them is an upper bound of that cost.
    for p in sorted(results.glob("similarity/*.h5")):  # selection and evaluate load each
        sim = load_similarity(p)
        name = "similarity validation (checksums, shapes, ranges), x2 loads"
        timed(name, lambda p=p: verify_hdf5(p), 2)
        timed(name, lambda sim=sim, p=p: validate_similarity(sim, p), 2)
    for p in sorted(results.glob("projection/**/*.h5")):
        timed("projection file checksums (evaluate)", lambda p=p: verify_hdf5(p))
    jobs = sum(pl.read_csv(t, separator="\t")["s"].sum() for t in Path(args.benchmarks).rglob("*.tsv"))
    total = sum(timings.values())
    print(f"# tdabench.dev.bench checks --results {results}   ({os.cpu_count()} CPUs)")
    for name, seconds in timings.items():
        print(f"{seconds:8.2f} s  {name}")
    print(f"{total:8.2f} s  all checks = {100 * total / jobs:.1f}% of the jobs' {jobs:.0f} s (benchmarks/*.tsv)")
