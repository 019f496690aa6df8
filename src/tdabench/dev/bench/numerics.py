"""`bench numerics`: portable against native numerics (tdabench.numerics). The kernel pins are read
when torch loads, so each mode runs in its own worker process."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tdabench.dev.bench.kit import fmt, load, machine
from tdabench.dev.bench.workload import build, encoded


def numerics_worker(model_spec: str, samples: int, length: int, batch_size: int, threads: int) -> dict:
    """One worker of `bench numerics`, in a process whose mode was pinned before torch loaded:
    seconds of one pass of AdamW steps and of one extraction pass over the same examples."""
    from tdabench import numerics
    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.models import collate
    from tdabench.train import lm_loss

    torch.set_num_threads(threads)
    numerics.configure_torch(numerics.mode())
    model, ids, mask, labels = build(model_spec, samples, length)
    examples = encoded(ids, mask, labels)
    batches = [collate(examples[s : s + batch_size], 0) for s in range(0, samples, batch_size)]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    def train_pass():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            lm_loss(model, batch).backward()
            opt.step()
        model.eval()

    names = ["q", "k", "v", "o", "gate", "up", "down"] + (["lm_head"] if model_spec == "tiny" else [])
    extraction = Extraction(model, ExtractionConfig(tuple(names), batch_size, None, 0, None))

    def extract_pass():
        for batch in batches:
            extraction(batch)

    out = {"mode": numerics.mode(), "kernel_level": torch.backends.cpu.get_cpu_capability(), "tokens": tokens}
    for name, fn in (("train", train_pass), ("extract", extract_pass)):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - start
    return out


WORKER = (
    "import json, sys; from tdabench import numerics; numerics.pin_environment(sys.argv[1]); "
    "from tdabench.dev.bench.numerics import numerics_worker; "
    "print(json.dumps(numerics_worker(sys.argv[2], *map(int, sys.argv[3:]))))"
)


def _run_worker(mode: str, args) -> dict:
    import json
    import subprocess
    import sys

    argv = [args.model, args.samples, args.length, args.batch_size, args.threads]
    result = subprocess.run(
        [sys.executable, "-c", WORKER, mode, *map(str, argv)], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(f"numerics worker ({mode}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _study_seconds(mode: str, cores: int) -> float:
    """Wall time of the whole default study from scratch in a temporary copy of this checkout."""
    import shutil
    import subprocess
    import sys

    import tdabench

    root = Path(tdabench.__file__).resolve().parents[2]  # the checkout: src/tdabench/__init__.py
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    with tempfile.TemporaryDirectory(prefix=f"tdabench-{mode}-") as tmp:
        for name in ("Snakefile", "workflow", "config", "src", "envs"):
            source = root / name
            if source.is_dir():
                shutil.copytree(source, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(source, Path(tmp) / name)
        start = time.perf_counter()
        result = subprocess.run(
            [snakemake, "--cores", str(cores), "--config", f"numerics={mode}"], cwd=tmp, capture_output=True, text=True
        )
        if result.returncode:
            raise SystemExit(f"the study ({mode}) failed:\n{result.stderr[-3000:]}")
        return time.perf_counter() - start


def run(args) -> None:
    modes = ("native", "portable")
    print(
        f"# tdabench.dev.bench numerics --model {args.model} --samples {args.samples} --length {args.length} "
        f"--batch-size {args.batch_size} --threads {args.threads} --rounds {args.rounds}"
        + (" --study" if args.study else "")
    )
    print(f"# {machine()}; load average {load()} at start")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes[r % 2 :] + modes[: r % 2]:
            runs[mode].append(_run_worker(mode, args))
    print(
        f"# {args.rounds} rounds, one fresh process per mode and round (order rotating); in each, one pass "
        "after a warm-up pass; median [interquartile range]"
    )
    for mode in modes:
        first = runs[mode][0]
        print(f"# {mode}: {first['kernel_level']} kernels, {first['tokens']} tokens a pass (padding included)")
    for what in ("train", "extract"):
        seconds = {m: np.array([run[what] for run in runs[m]]) for m in modes}
        ratio = seconds["portable"] / seconds["native"]
        print(
            f"{what:<8} native {fmt(seconds['native'])} s   portable {fmt(seconds['portable'])} s   "
            f"portable/native x{fmt(ratio)}"
        )
    if args.study:
        walls: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in modes[r % 2 :] + modes[: r % 2]:
                walls[mode].append(_study_seconds(mode, args.threads))
        ratio = np.array(walls["portable"]) / np.array(walls["native"])
        print(
            f"study    native {fmt(np.array(walls['native']), 0)} s   portable "
            f"{fmt(np.array(walls['portable']), 0)} s   portable/native x{fmt(ratio)}   "
            f"(default study from scratch, --cores {args.threads})"
        )
    print(f"# load average {load()} at end")
