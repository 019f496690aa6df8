"""Benchmarks that print numbers (never asserted in tests).

python -m tdabench.bench gradients [--model tiny|llama-135m|PATH] [--samples N] [--batch-size B]
    samples/s and peak RSS, on the same samples, of
      (a) our extractor, all components
      (b) our extractor, a selection (the last layer's MLP; a greedy-selected set)
      (c) the reference-style loop: bs=1, loss.backward(), clone every .grad
      (d) a plain batched forward+backward (the floor no per-sample extractor can beat)
    each variant in its own process, so each peak RSS is its own.
python -m tdabench.bench store --model llama-135m --samples 64 --max-component-dim 65536
    write a gradient store with the dimension cap: peak RSS, file size against the estimate.
python -m tdabench.bench greedy [--components 113 --queries 988 --candidates 5]
    greedy forward selection run to the end on a random similarity store of the published size.
python -m tdabench.bench architectures [--jobs 2] [--output docs/architectures.md] [TYPE ...]
    every causal-LM architecture of transformers, built tiny: per-sample gradients vs the bs=1
    loop (tdabench.architectures); writes the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    # SmolLM2-135M's shape (Llama architecture, tied embeddings), randomly initialised.
    "llama-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
}
GREEDY_SET = "results/selection/paraphrased.parquet"


def build(model_spec: str, samples: int, length: int, seed: int = 0):
    """(model, input_ids, attention_mask, labels) with response-style labels on the second half."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tdabench.config import validate_config
    from tdabench.models import TinyModelConfig

    torch.manual_seed(seed)
    if model_spec == "tiny":
        tiny = TinyModelConfig(**validate_config({})["model"]["tiny"])
        config = LlamaConfig(
            vocab_size=tiny.vocab_size,
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    elif model_spec in MODELS:
        model = LlamaForCausalLM(LlamaConfig(**MODELS[model_spec]))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_spec, dtype=torch.float32)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    lengths = torch.randint(length // 2, length + 1, (samples,), generator=gen)
    ids = torch.zeros(samples, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, :n] = 1
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
    return model, ids, mask, labels


def greedy_selection(names: list[str]) -> tuple[list[str], str]:
    """The default study's chosen greedy set if it was run here, else a fixed stand-in."""
    from tdabench.components import match_components

    path = Path(GREEDY_SET)
    if path.exists():
        from tdabench.selection import SelectionTable

        picked = [c for c in SelectionTable.read(path).greedy_set(0) if c in names]
        if picked:
            return picked, f"greedy set from {path} ({len(picked)} components)"
    return match_components(names, ["lm_head", "mlp@-1"]), "stand-in set lm_head + last MLP (no greedy result here)"


def run_variant(variant: str, model_spec: str, samples: int, length: int, batch_size: int, device: str = "cpu") -> dict:
    from tdabench.components import component_registry, match_components
    from tdabench.device import resolve_device, synchronize
    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.gradients import iter_batches, per_sample_loss

    where = resolve_device(device)
    model, ids, mask, labels = build(model_spec, samples, length)
    model.to(where)
    ids, mask, labels = ids.to(where), mask.to(where), labels.to(where)
    names = [c.name for c in component_registry(model)]
    note = ""
    comps = names  # a_all, and the coverage of the reference loop and the plain pass
    if variant == "b_last_mlp":
        comps = match_components(names, ["mlp@-1"])
    elif variant == "b_greedy":
        comps, note = greedy_selection(names)

    extraction = Extraction(model, ExtractionConfig(tuple(comps), batch_size, None, 0, None))

    def ours(rows):
        extraction({"input_ids": ids[rows], "attention_mask": mask[rows], "labels": labels[rows]})

    def reference(rows):  # what the paper's reference code does: one sample at a time
        for b in range(rows.start, rows.stop):
            keep = mask[b].bool()
            model.zero_grad(set_to_none=True)
            per_sample_loss(model(input_ids=ids[b, keep][None]).logits, labels[b, keep][None]).sum().backward()
            [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    def plain(rows):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model(input_ids=ids[rows], attention_mask=mask[rows]).logits, labels[rows]).sum().backward()

    fn = {"c_reference_loop": reference, "d_plain_fwd_bwd": plain}.get(variant, ours)
    batches = list(iter_batches(samples, batch_size))
    fn(batches[0])  # warm-up
    synchronize(where)
    start = time.perf_counter()
    for rows in batches:
        fn(rows)
    synchronize(where)
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "samples_per_s": samples / seconds,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "note": note,
        "n_components": len(comps) if variant.startswith(("a", "b")) else len(names),
    }


def gradients_main(args) -> None:
    variants = ["a_all", "b_last_mlp", "b_greedy", "c_reference_loop", "d_plain_fwd_bwd"]
    results = []
    for v in variants:
        cmd = [
            sys.executable,
            "-m",
            "tdabench.bench",
            "_variant",
            v,
            "--model",
            args.model,
            "--samples",
            str(args.samples),
            "--length",
            str(args.length),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    floor = next(r for r in results if r["variant"] == "d_plain_fwd_bwd")["samples_per_s"]
    ref = next(r for r in results if r["variant"] == "c_reference_loop")["samples_per_s"]
    print(
        f"# tdabench.bench gradients --model {args.model} --samples {args.samples} --length {args.length} "
        f"--batch-size {args.batch_size} --threads {args.threads} --device {args.device}"
    )
    from tdabench.device import describe, resolve_device

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"# device {describe(resolve_device(args.device))}")
    print(f"{'variant':<18} {'samples/s':>10} {'x plain (d)':>11} {'x loop (c)':>10} {'peak RSS MB':>11}  components")
    for r in results:
        print(
            f"{r['variant']:<18} {r['samples_per_s']:>10.1f} {r['samples_per_s'] / floor:>11.2f} "
            f"{r['samples_per_s'] / ref:>10.2f} {r['peak_rss_mb']:>11.0f}  {r['n_components']} {r['note']}"
        )
    by = {r["variant"]: r["samples_per_s"] for r in results}
    print(
        f"# (a)/(d) = {by['a_all'] / floor:.2f}   last-MLP/(a) = {by['b_last_mlp'] / by['a_all']:.2f}   "
        f"(a)/(c) = {by['a_all'] / ref:.2f}"
    )


def store_main(args) -> None:
    """Gradient store of a big model with the dimension cap: peak RSS and size vs estimate."""
    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.gradients import iter_batches
    from tdabench.store import GradientStoreWriter, estimate_bytes

    model, ids, mask, labels = build(args.model, args.samples, args.length)
    cap = args.max_component_dim
    extraction = Extraction(model, ExtractionConfig(("all",), args.batch_size, cap, 0, None))
    comps, info = extraction.components, extraction.sketch_info
    stored = extraction.stored_dims
    estimate = estimate_bytes(args.samples, stored, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.h5"
        start = time.perf_counter()
        with GradientStoreWriter(path, [f"s{i}" for i in range(args.samples)], comps, args.dtype, {}, info) as w:
            for rows in iter_batches(args.samples, args.batch_size):
                g = extraction({"input_ids": ids[rows], "attention_mask": mask[rows], "labels": labels[rows]})
                w.write(rows, {n: v.numpy() for n, v in g.items()})
        seconds = time.perf_counter() - start
        size = path.stat().st_size
    params = sum(c.numel for c in comps)
    print(
        f"# tdabench.bench store --model {args.model} --samples {args.samples} --length {args.length} "
        f"--batch-size {args.batch_size} --max-component-dim {cap} --dtype {args.dtype}"
    )
    print(f"parameters {params:,} in {len(comps)} components, {len(info)} sketched to {cap:,} dims")
    print(f"stored dims per sample {sum(stored):,}; full gradient would be {params * 4 * args.samples / 1e9:.2f} GB")
    print(f"store size {size / 1e6:.1f} MB, estimate {estimate / 1e6:.1f} MB, ratio {size / estimate:.3f}")
    print(
        f"time {seconds:.1f} s ({args.samples / seconds:.2f} samples/s), "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024:.2f} GiB"
    )


def greedy_main(args) -> None:
    """Greedy selection on a random candidate-layout similarity store of the published size."""
    import numpy as np

    from tdabench.selection import greedy_forward
    from tdabench.similarity import Similarity

    rng = np.random.default_rng(0)
    c, q, b, t = args.components, args.queries, args.candidates, args.queries * 2
    cands = np.stack([rng.choice(t, b, replace=False) for _ in range(q)])
    sim = Similarity(
        components=[f"c{i}" for i in range(c)],
        component_params=rng.integers(1000, 10**6, c),
        component_family=["other"] * c,
        component_layer=np.full(c, -1),
        query_ids=[f"q{i}" for i in range(q)],
        train_ids=[f"t{i}" for i in range(t)],
        ground_truth=cands[:, -1],
        query_sqnorm=rng.random((c, q)) + 0.5,
        train_sqnorm=rng.random((c, t)) + 0.5,
        dot=rng.standard_normal((c, q, b)),
        attrs={},
        candidates=cands,
    )
    for objective in ("top1", "mrr", "rho"):
        start = time.perf_counter()
        steps = greedy_forward(sim, np.arange(q), objective)
        print(
            f"greedy {objective:<4}: {len(steps)} steps over {c} components x {q} queries x {b} candidates "
            f"in {time.perf_counter() - start:.2f} s"
        )


def checks_main(args) -> None:
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
    print(f"# tdabench.bench checks --results {results}   ({os.cpu_count()} CPUs)")
    for name, seconds in timings.items():
        print(f"{seconds:8.2f} s  {name}")
    print(f"{total:8.2f} s  all checks = {100 * total / jobs:.1f}% of the jobs' {jobs:.0f} s (benchmarks/*.tsv)")


def _check_one(model_type: str):
    import warnings

    from transformers.utils import logging as hf_logging

    from tdabench.architectures import check_architecture

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    return check_architecture(model_type)


def architectures_main(args) -> None:
    """Check every architecture (one process per worker, fresh every few models) and write the table."""
    import multiprocessing

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    start = time.perf_counter()
    results = []
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=8) as pool:
        for r in pool.imap(_check_one, types):
            results.append(r)
            print(f"{r.model_type:<28} {r.status:<9} {r.seconds:5.1f} s  {r.reason[:100]}", flush=True)
    from tdabench.architectures import render_markdown

    header = (
        f"transformers {transformers.__version__}, torch {torch.__version__}; "
        f"{len(types)} architectures checked in {time.perf_counter() - start:.0f} s with {args.jobs} workers."
    )
    text = render_markdown(results, header)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    if any(r.status in ("wrong", "error") for r in results):
        raise SystemExit("some architectures are wrong or crash the extractor (see the table)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tdabench.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("greedy")
    g.add_argument("--components", type=int, default=113)
    g.add_argument("--queries", type=int, default=988)
    g.add_argument("--candidates", type=int, default=5)
    g.add_argument("--threads", type=int, default=torch.get_num_threads())
    c = sub.add_parser("checks")
    c.add_argument("--results", default="results")
    c.add_argument("--benchmarks", default="benchmarks")
    c.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = sub.add_parser("architectures")
    a.add_argument("types", nargs="*", help="model types (keys of the causal-LM mapping); default: all")
    a.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    a.add_argument("--output", default=None, help="write the markdown table here (e.g. docs/architectures.md)")
    a.add_argument("--threads", type=int, default=1)
    for name in ("gradients", "store", "_variant"):
        p = sub.add_parser(name)
        if name == "_variant":
            p.add_argument("variant")
        p.add_argument("--model", default="tiny", help="tiny (the default study's shape), llama-135m, or a local path")
        p.add_argument("--samples", type=int, default=256 if name != "store" else 64)
        p.add_argument("--length", type=int, default=40 if name != "store" else 64, help="tokens per sample (max)")
        p.add_argument("--batch-size", type=int, default=32 if name != "store" else 8)
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
        if name != "store":
            p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (config key device)")
        if name == "store":
            p.add_argument("--max-component-dim", type=int, default=65536)
            p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "_variant":
        print(
            json.dumps(run_variant(args.variant, args.model, args.samples, args.length, args.batch_size, args.device))
        )
    elif args.command == "gradients":
        gradients_main(args)
    elif args.command == "greedy":
        greedy_main(args)
    elif args.command == "architectures":
        architectures_main(args)
    elif args.command == "checks":
        checks_main(args)
    else:
        store_main(args)


if __name__ == "__main__":
    main()
