"""`tdabench` command line: analyse any similarity store (ours, or one written by other code).

    tdabench evaluate   --similarity FILE [--components PATTERN ...] [--queries SPEC] [--out F.json]
    tdabench components --similarity FILE --out F.parquet [--queries SPEC]
    tdabench greedy     --similarity FILE --objective {top1,mrr,rho} [--selection-fraction F --seed N] --out F.parquet
    tdabench agree      A.h5 B.h5 [--queries SPEC] [--selection-fraction F --seed N] [--steps N] [--out F.json]
                        two stores of the same queries (e.g. sketched vs exact, cached vs streamed):
                        cosine differences, full-gradient and per-component metrics, greedy choices
    tdabench config     [--config FILE]        print the validated config with every default
    tdabench verify     PATH ...               check stores and tables against their checksums and formats
    tdabench compare    A B [--show N]         two results folders, stage by stage in DAG order: the first
                                               stage whose outputs differ, by how much, and how the runs'
                                               recorded environments differ (tdabench.compare)
    tdabench log        [WORKDIR] [--tracking-uri URI] [--deadline S]
                                               log the study's recorded runs (logs/mlflow/) into MLflow;
                                               idempotent: what is logged already is not logged twice
    tdabench doctor     [--configfile F ...] [--directory D] [--torch]
                                               check this environment for the study: torch and CUDA, the
                                               device `auto` picks, numerics pins, the MLflow store, SLURM,
                                               free disk; exit 1, with the fix, for what would fail

The similarity store format is documented in tdabench.similarity (and the README); both the dense
layout and the candidate layout are accepted. Metrics rank within the candidates when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from tdabench.config import default


class UsageError(Exception):
    """A bad argument or input file: one line, exit code 2 (as argparse does)."""


def _int_at_least(text: str, minimum: int, why: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def seed(text: str) -> int:
    return _int_at_least(text, 0, " (numpy seeds are non-negative)")


def _sim(path: str):
    from tdabench.similarity import load_similarity

    return load_similarity(path)


def _queries(sim, spec: str | None, seed: int) -> np.ndarray:
    """SPEC: a fraction in (0, 1] (seeded random subset), comma-separated ids, or @FILE (one id per line)."""
    if spec is None:
        return sim.all_queries()
    try:
        fraction = float(spec)
    except ValueError:
        fraction = None
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UsageError(f"--queries: fraction must be in (0, 1], got {spec}")
        n = max(1, round(fraction * len(sim.query_ids)))
        canonical = np.argsort(np.array(sim.query_ids, dtype=object), kind="stable")
        return np.sort(canonical[np.random.default_rng(seed).permutation(len(canonical))[:n]])
    if spec.startswith("@") and not Path(spec[1:]).is_file():
        raise UsageError(f"--queries: no such file {spec[1:]}")
    ids = Path(spec[1:]).read_text().split() if spec.startswith("@") else [s for s in spec.split(",") if s]
    if not ids:
        raise UsageError(f"--queries {spec!r}: no query ids")
    if len(set(ids)) != len(ids):
        raise UsageError(f"--queries: duplicate query ids {sorted({q for q in ids if ids.count(q) > 1})[:5]}")
    row = {q: i for i, q in enumerate(sim.query_ids)}
    unknown = [q for q in ids if q not in row]
    if unknown:
        raise UsageError(f"--queries: unknown query ids {unknown[:5]} (the file has e.g. {sim.query_ids[:3]})")
    return np.array(sorted(row[q] for q in ids))


def _components(sim, patterns: list[str] | None) -> np.ndarray:
    from tdabench.components import match_components

    if not patterns:
        return np.arange(len(sim.components))
    try:
        names = match_components(sim.components, patterns, sim.component_family, sim.component_layer.tolist())
    except ValueError as e:
        raise UsageError(f"--components: {e}") from None
    return sim.component_index(names)


def _write_table(rows: list[dict], out: str) -> None:
    from tdabench.io import write_parquet

    table = pl.DataFrame(rows)
    if out.endswith(".csv"):
        table.write_csv(out)
    else:
        write_parquet(table, out)
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)


def cmd_evaluate(args) -> None:
    from tdabench.metrics import retrieval_metrics, source_ranks

    sim = _sim(args.similarity)
    queries = _queries(sim, args.queries, args.seed)
    comps = _components(sim, args.components)
    metrics = retrieval_metrics(source_ranks(sim.scores(comps, queries), sim.targets(queries)), args.k)
    result = {
        "similarity": args.similarity,
        "layout": "dense" if sim.candidates is None else f"candidates (b={sim.n_columns})",
        "provenance": sim.provenance(),
        "n_queries": int(len(queries)),
        "components": [sim.components[c] for c in comps],
        "params": int(sim.component_params[comps].sum()),
        "dim": int(sim.component_dim[comps].sum()),
        "top1": metrics["top1"],
        "mrr": metrics["mrr"],
        "recall_at_k": {str(k): metrics[f"recall_at_{k}"] for k in args.k},
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


def cmd_components(args) -> None:
    from tdabench.metrics import retrieval_metrics, score_agreement, source_ranks

    sim = _sim(args.similarity)
    queries = _queries(sim, args.queries, args.seed)
    targets, full = sim.targets(queries), sim.scores(None, queries)
    rows = []
    for c, name in enumerate(sim.components):
        scores = sim.scores([c], queries)
        m = retrieval_metrics(source_ranks(scores, targets), args.k)
        rows.append(
            {
                "component": name,
                "family": sim.component_family[c],
                "layer": int(sim.component_layer[c]),
                "params": int(sim.component_params[c]),
                "dim": int(sim.component_dim[c]),
                "method": sim.component_method[c],
                "way": sim.component_way[c],
                "top1": m["top1"],
                "mrr": m["mrr"],
                "rho": float(score_agreement(scores, full)),
                **{f"recall_at_{k}": m[f"recall_at_{k}"] for k in args.k},
            }
        )
    _write_table(rows, args.out)


def cmd_greedy(args) -> None:
    from tdabench.metrics import retrieval_metrics, source_ranks
    from tdabench.selection import greedy_forward, split_queries

    sim = _sim(args.similarity)
    if args.selection_fraction is None:
        sel = held = sim.all_queries()
        scored_on = "in-sample"
        print(
            "greedy: no --selection-fraction: components are chosen and scored on the same queries "
            "(in-sample; optimistic)",
            file=sys.stderr,
        )
    else:
        sel, held = split_queries(sim.query_ids, args.selection_fraction, args.seed)
        scored_on = "held-out"
    steps = greedy_forward(sim, sel, args.objective)
    params = sim.component_params
    total = int(params.sum())
    rows, chosen = [], []
    for s in steps:
        chosen.append(s.component)
        m = retrieval_metrics(source_ranks(sim.scores(chosen, held), sim.targets(held)), args.k)
        rows.append(
            {
                "step": s.step,
                "component": sim.components[s.component],
                "params": int(params[s.component]),
                "params_cum": int(params[chosen].sum()),
                "param_share": float(params[chosen].sum() / total),
                "dim_cum": int(sim.component_dim[chosen].sum()),
                "objective": s.objective,
                "objective_name": args.objective,
                "top1": m["top1"],
                "mrr": m["mrr"],
                **{f"recall_at_{k}": m[f"recall_at_{k}"] for k in args.k},
                "scored_on": scored_on,
                "n_selection_queries": int(len(sel)),
                "n_scored_queries": int(len(held)),
            }
        )
    _write_table(rows, args.out)


def agreement(a, b, queries: np.ndarray, selection: np.ndarray, objective: str, steps: int, ks) -> dict:
    """How far two similarity stores of the same queries and training examples agree: cosines,
    full-gradient and per-component metrics on `queries`, and the first `steps` greedy choices
    made on `selection`. Components are matched by name (those both stores have)."""
    from tdabench.metrics import retrieval_metrics, source_ranks
    from tdabench.selection import greedy_forward

    if a.query_ids != b.query_ids or a.train_ids != b.train_ids:
        raise UsageError("the stores hold different queries or training examples; agree compares one study's stores")
    if (a.candidates is None) != (b.candidates is None) or (
        a.candidates is not None and not np.array_equal(a.candidates, b.candidates)
    ):
        raise UsageError("the stores score different columns (layout or candidates differ)")
    common = [n for n in a.components if n in set(b.components)]
    if not common:
        raise UsageError("the stores have no component in common")
    ca, cb = a.component_index(common), b.component_index(common)
    targets = a.targets(queries)

    def metrics(sim, comps):
        m = retrieval_metrics(source_ranks(sim.scores(comps, queries), targets), ks)
        return {"top1": m["top1"], "mrr": m["mrr"]}

    per_a = [metrics(a, [i])["top1"] for i in ca]
    per_b = [metrics(b, [i])["top1"] for i in cb]
    cos_diff = [float(np.abs(a.scores([i], queries) - b.scores([j], queries)).max()) for i, j in zip(ca, cb)]
    ranks_a, ranks_b = (np.argsort(np.argsort(-np.array(v), kind="stable")) for v in (per_a, per_b))
    greedy = {}
    for name, sim, comps in (("a", a, ca), ("b", b, cb)):
        sub = _restrict(sim, comps)
        picked = [sub.components[s.component] for s in greedy_forward(sub, selection, objective)[:steps]]
        greedy[name] = picked
    return {
        "n_queries": int(len(queries)),
        "n_components": len(common),
        "a": a.provenance(),
        "b": b.provenance(),
        "max_abs_cosine_diff": {
            "full": float(np.abs(a.scores(ca, queries) - b.scores(cb, queries)).max()),
            "per_component": max(cos_diff),
        },
        "full": {"a": metrics(a, ca), "b": metrics(b, cb)},
        "per_component_top1": {
            "spearman": float(np.corrcoef(ranks_a, ranks_b)[0, 1]) if len(common) > 1 else 1.0,
            "mean_abs_diff": float(np.mean(np.abs(np.array(per_a) - np.array(per_b)))),
            "best_a": [common[int(np.argmax(per_a))], max(per_a)],
            "best_b": [common[int(np.argmax(per_b))], max(per_b)],
        },
        "greedy": {**greedy, "objective": objective, "same_first": sum(x == y for x, y in zip(*greedy.values()))},
    }


def _restrict(sim, comps: np.ndarray):
    """`sim` with only the components `comps` (in that order)."""
    from dataclasses import replace

    return replace(
        sim,
        components=[sim.components[c] for c in comps],
        component_params=sim.component_params[comps],
        component_family=[sim.component_family[c] for c in comps],
        component_layer=sim.component_layer[comps],
        query_sqnorm=sim.query_sqnorm[comps],
        train_sqnorm=sim.train_sqnorm[comps],
        dot=sim.dot[comps],
        component_dim=sim.component_dim[comps],
        component_method=[sim.component_method[c] for c in comps],
        component_way=[sim.component_way[c] for c in comps],
    )


def cmd_agree(args) -> None:
    from tdabench.selection import split_queries

    a, b = _sim(args.a), _sim(args.b)
    queries = _queries(a, args.queries, args.seed)
    if args.selection_fraction is None:
        selection = queries
    else:
        selection, _ = split_queries(a.query_ids, args.selection_fraction, args.seed)
    result = {"a_file": args.a, "b_file": args.b}
    result |= agreement(a, b, queries, selection, args.objective, args.steps, args.k)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


def cmd_config(args) -> None:
    import yaml

    from tdabench.config import load_config, validate_config

    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config: no such file {args.config}")
    cfg = load_config(args.config) if args.config else validate_config({})
    print(yaml.safe_dump(cfg, sort_keys=False), end="")


def cmd_verify(args) -> None:
    from tdabench.verify import verify

    n, problems = verify(args.paths)
    if n == 0:
        raise UsageError(f"no stores (.h5) or tables (.parquet) under {', '.join(args.paths)}")
    for p in problems:
        print(p)
    if problems:
        raise SystemExit(1)
    print(f"{n} files checked: every store matches its checksums and every table reads in full")


def cmd_compare(args) -> None:
    from tdabench.compare import compare_stages, environment_differences, first_difference

    for folder in (args.a, args.b):
        if not Path(folder).is_dir():
            raise UsageError(f"compare: {folder} is not a folder (give two results folders)")
    reports = compare_stages(args.a, args.b)
    if not reports:
        raise UsageError(f"compare: no study outputs under {args.a} or {args.b} (results folders of `make run`)")
    for r in reports:
        status = "same" if r.same else f"DIFFERS ({len(r.differences)} difference(s))"
        print(f"{r.stage}: {status}, {r.files} file(s)")
        for d in r.differences[: args.show]:
            print(f"    {d}")
        if len(r.differences) > args.show:
            print(f"    ... and {len(r.differences) - args.show} more")
    env = environment_differences(args.a, args.b)
    if env:
        print("recorded environments differ (provenance.json):")
        for line in env[: args.show * 4]:
            print(f"    {line}")
    first = first_difference(reports)
    if first is None:
        print(f"same numbers: every stage's outputs are identical (timings ignored) in {args.a} and {args.b}")
        return
    print(f"first difference: {first.stage} ({first.differences[0]}); later stages follow from it")
    raise SystemExit(1)


def cmd_log(args) -> None:
    from tdabench.mlflow_log import invocation_folders, publish

    if not invocation_folders(args.workdir):
        raise UsageError(f"log: no tracking records under {Path(args.workdir) / 'logs' / 'mlflow'} (a study's workdir)")
    report = publish(args.workdir, args.tracking_uri, args.deadline, args.request_timeout)
    print(report.line())
    if report.pending:
        raise SystemExit(1)


def cmd_doctor(args) -> None:
    from tdabench.doctor import run_checks, torch_line

    if args.torch:
        print(f"[tdabench] {torch_line()}")
        return
    if not Path(args.directory).is_dir():
        raise UsageError(f"doctor: --directory {args.directory} is not a folder")
    checks = run_checks(args.configfile, args.directory)
    print(f"tdabench doctor ({Path(args.directory).resolve()})")
    for check in checks:
        print(check.line())
    failed = [c.what for c in checks if c.status == "FAIL"]
    if failed:
        print(f"{len(failed)} check(s) failed: {', '.join(failed)}; the study would fail or lose its runs here")
        raise SystemExit(1)
    print("ready: nothing here would stop the study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdabench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ks, objective = default("evaluation.recall_at"), default("selection.objective")  # the study's defaults

    def common(p, queries=True):
        p.add_argument("--similarity", required=True, help="similarity store (HDF5, tdabench-similarity/1)")
        if queries:
            p.add_argument("--queries", help="a fraction in (0, 1] (seeded subset), comma-separated ids, or @FILE")
        p.add_argument("--seed", type=seed, default=0, help="seed of --queries fractions and splits (default 0)")
        p.add_argument("--k", type=positive_int, nargs="+", default=ks, help=f"recall@k cut-offs (default {ks})")

    p = sub.add_parser("evaluate", help="top-1, MRR, recall@k of a component subset (JSON)")
    common(p)
    p.add_argument("--components", nargs="+", help="patterns: family, group (attn, mlp), glob, @layers; default all")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("components", help="one row per component: params, top1, mrr, rho")
    common(p)
    p.add_argument("--out", required=True, help="output table (.parquet or .csv)")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("greedy", help="greedy forward selection run to the end, one row per step")
    common(p, queries=False)
    p.add_argument("--objective", choices=["top1", "mrr", "rho"], default=objective)
    p.add_argument(
        "--selection-fraction",
        type=float,
        help="choose on this share of the queries, score on the rest (default: in-sample)",
    )
    p.add_argument("--out", required=True, help="output table (.parquet or .csv)")
    p.set_defaults(func=cmd_greedy)

    p = sub.add_parser("agree", help="do two similarity stores of the same queries agree? (JSON)")
    p.add_argument("a", help="a similarity store (e.g. sketched, or cached)")
    p.add_argument("b", help="another store of the same queries (e.g. exact, or streamed)")
    p.add_argument("--queries", help="a fraction in (0, 1] (seeded subset), comma-separated ids, or @FILE")
    p.add_argument("--seed", type=seed, default=0, help="seed of --queries fractions and the split (default 0)")
    p.add_argument("--k", type=positive_int, nargs="+", default=ks, help="recall@k cut-offs")
    p.add_argument("--objective", choices=["top1", "mrr", "rho"], default=objective, help="of greedy selection")
    p.add_argument(
        "--selection-fraction", type=float, help="greedy chooses on this share of the queries (default: all)"
    )
    p.add_argument("--steps", type=positive_int, default=5, help="greedy choices compared (default 5)")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    p.set_defaults(func=cmd_agree)

    p = sub.add_parser("config", help="print the validated config, defaults filled")
    p.add_argument("--config", help="config file (default: the schema defaults)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("verify", help="check stores and tables against their checksums and formats")
    p.add_argument("paths", nargs="*", default=["results"], help="files or folders (default: results)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "compare", help="do two results folders hold the same numbers? names the first stage where they part"
    )
    p.add_argument("a", help="a results folder (e.g. results/)")
    p.add_argument("b", help="another results folder")
    p.add_argument("--show", type=positive_int, default=3, help="differences listed per stage (default 3)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("log", help="log a study's recorded runs into MLflow (idempotent)")
    p.add_argument("workdir", nargs="?", default=".", help="the study's working directory (default: .)")
    p.add_argument("--tracking-uri", help="log here instead of the store each invocation recorded")
    p.add_argument("--deadline", type=float, help="seconds; stop then and leave the rest pending")
    p.add_argument("--request-timeout", type=positive_int, default=10, help="seconds per MLflow request")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("doctor", help="check this environment for the study (torch, device, MLflow, disk)")
    p.add_argument("--configfile", nargs="+", default=[], help="the study's config files, as given to snakemake")
    p.add_argument("--directory", default=".", help="the study's working directory (default: .)")
    p.add_argument("--torch", action="store_true", help="only one line: torch's build, CUDA and the GPU")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = f"{parser.prog} {args.command}"
    if getattr(args, "selection_fraction", None) is not None and not 0 < args.selection_fraction < 1:
        parser.exit(2, f"{sub}: error: --selection-fraction must be in (0, 1), got {args.selection_fraction}\n")
    stores = [("--similarity", getattr(args, "similarity", None))]
    if args.command == "agree":
        stores = [("", args.a), ("", args.b)]
    for option, path in stores:
        if path is None:
            continue
        where = f"{option}: " if option else ""
        if not Path(path).is_file():
            parser.exit(2, f"{sub}: error: {where}no such file {path}\n")
        if not h5py.is_hdf5(path):
            parser.exit(
                2,
                f"{sub}: error: {where}{path} is not a similarity store (an HDF5 file such as "
                "results/similarity/paraphrased.h5)\n",
            )
    try:
        args.func(args)
    except (UsageError, FileNotFoundError, KeyError, ValueError) as e:  # ValueError: config, corrupt or wrong file
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        parser.exit(2, f"{sub}: error: {message}\n")


if __name__ == "__main__":
    main()
