"""`python -m tdabench.dev.bench SUBCOMMAND`: the options of every benchmark, dispatched to its module."""

from __future__ import annotations

import argparse
import importlib
import os

import torch

from tdabench.dev import bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (counts, sizes, rounds, threads)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tdabench.dev.bench",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("greedy")
    g.add_argument("--components", type=positive, default=113)
    g.add_argument("--queries", type=positive, default=988)
    g.add_argument("--candidates", type=positive, default=5)
    g.add_argument("--threads", type=positive, default=torch.get_num_threads())
    g.add_argument("--rounds", type=positive, default=5)
    pr = sub.add_parser("projections")
    pr.add_argument("--dim", type=positive, default=2**20, help="input dimension D")
    pr.add_argument("--samples", type=positive, default=32)
    pr.add_argument("--k", type=positive, nargs="+", default=[4096, 8192])
    pr.add_argument("--rounds", type=positive, default=5)
    pr.add_argument(
        "--trak-block-size", type=positive, default=100, help="TRAK BasicProjector's block_size (its default)"
    )
    pr.add_argument("--threads", type=positive, default=torch.get_num_threads())
    sw = sub.add_parser("sweep")
    sw.add_argument("--samples", type=positive, default=131, help="rows of a group (SmolLM2's study: 131)")
    sw.add_argument("--layers", type=positive, default=30, help="layers of the model (block-wise sizes)")
    sw.add_argument("--hidden", type=positive, default=576, help="hidden size (default: SmolLM2-135M's)")
    sw.add_argument("--kv", type=positive, default=192, help="key/value width")
    sw.add_argument("--intermediate", type=positive, default=1536, help="MLP width")
    sw.add_argument("--methods", nargs="+", default=["sjlt", "blockwise"])
    sw.add_argument("--k", type=positive, nargs="+", default=[256, 1024, 4096])
    sw.add_argument("--seeds", type=positive, default=2)
    sw.add_argument("--rounds", type=positive, default=5)
    sw.add_argument("--threads", type=positive, default=torch.get_num_threads())
    c = sub.add_parser("checks")
    c.add_argument("--results", default="results")
    c.add_argument("--benchmarks", default="benchmarks")
    c.add_argument("--threads", type=positive, default=torch.get_num_threads())
    sm = sub.add_parser("similarity")
    sm.add_argument("--model", default="llama-135m", help="tiny, llama-135m (SmolLM2-135M's shape) or a local path")
    sm.add_argument("--components", nargs="+", default=["q", "k", "v", "o", "gate", "up", "down"])
    sm.add_argument("--lengths", type=positive, nargs="+", default=[64, 256], help="tokens per sample (max)")
    sm.add_argument("--candidates", type=positive, nargs="+", default=[5, 10], help="b of the candidate layout")
    sm.add_argument("--queries-per-round", type=positive, default=2)
    sm.add_argument("--train", type=positive, default=24, help="training examples")
    sm.add_argument("--dense-queries", type=positive, default=2)
    sm.add_argument("--batch-size", type=positive, default=8)
    sm.add_argument("--rounds", type=positive, default=2, help="timed rounds after one warm-up round")
    sm.add_argument("--memory-gb", type=float, default=4.0, help="similarity.memory_gb of the dense layout")
    sm.add_argument("--dense-train", type=positive, default=8, help="training examples of the dense layout")
    sm.add_argument("--max-cache-gb", type=float, default=6.0, help="largest cache cache-then-similarity may write")
    sm.add_argument("--overlap-queries", type=int, default=60, help="the paper-overlap case's queries (0: skip it)")
    sm.add_argument("--overlap-train", type=positive, default=60, help="the paper-overlap case's training examples")
    sm.add_argument("--overlap-b", type=positive, default=5, help="the paper-overlap case's candidates per query")
    sm.add_argument("--overlap-topics", type=positive, default=12, help="prompt vocabularies BM25 clusters by")
    sm.add_argument(
        "--cases",
        nargs="+",
        choices=["candidates", "dense", "overlap", "shared"],
        default=["candidates", "dense", "overlap"],
        help="which cases to run (e.g. the paper-overlap case alone, in a process of its own; `shared`, "
        "similarity plus projections in one pass against the floor, only when asked for)",
    )
    sm.add_argument("--shared-train", type=positive, default=140, help="the shared case's training examples")
    sm.add_argument("--shared-queries", type=positive, default=120, help="the shared case's queries (2 settings)")
    sm.add_argument("--projection-methods", nargs="+", default=["sjlt", "blockwise"], help="the shared case's")
    sm.add_argument("--projection-dims", type=positive, nargs="+", default=[256, 1024, 4096], help="the shared case's")
    sm.add_argument("--projection-seeds", type=int, nargs="+", default=[0, 1], help="the shared case's")
    sm.add_argument("--threads", type=positive, default=torch.get_num_threads())
    nm = sub.add_parser("numerics")
    nm.add_argument("--model", default="tiny", help="tiny (the default study's shape), llama-135m, or a local path")
    nm.add_argument("--samples", type=positive, default=128)
    nm.add_argument("--length", type=positive, default=40, help="tokens per sample (max)")
    nm.add_argument("--batch-size", type=positive, default=32)
    nm.add_argument("--rounds", type=positive, default=5)
    nm.add_argument("--study", action="store_true", help="also time the default study from scratch in each mode")
    nm.add_argument("--threads", type=positive, default=torch.get_num_threads())
    a = sub.add_parser("architectures")
    a.add_argument("types", nargs="*", help="model types (keys of the causal-LM mapping); default: all")
    a.add_argument("--jobs", type=positive, default=min(2, os.cpu_count() or 1), help="worker processes")
    a.add_argument("--output", default=None, help="write the markdown table here (e.g. docs/architectures.md)")
    a.add_argument("--threads", type=positive, default=1)
    for name in ("gradients", "store"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="tiny", help="tiny (the default study's shape), llama-135m, or a local path")
        p.add_argument("--samples", type=positive, default=256 if name != "store" else 64)
        p.add_argument("--length", type=positive, default=40 if name != "store" else 64, help="tokens per sample (max)")
        p.add_argument("--batch-size", type=positive, default=32 if name != "store" else 8)
        p.add_argument("--threads", type=positive, default=torch.get_num_threads())
        if name == "gradients":
            p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (config key device)")
            p.add_argument("--rounds", type=positive, default=20, help="timed rounds after one warm-up round")
            p.add_argument("--peers", action="store_true", help="add torch.func, Opacus (when installed)")
        if name == "store":
            p.add_argument("--rounds", type=positive, default=None, help="timed rounds + 1 warm-up (default: batches)")
            p.add_argument("--max-component-dim", type=positive, default=65536)
            p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    importlib.import_module(f"tdabench.dev.bench.{args.command}").run(args)  # one module per subcommand


if __name__ == "__main__":
    main()
