"""The README's result blocks, rendered from result files, never typed by hand.

    python -m tdabench.dev.docs render [--readme README.md]   (make docs)
        rewrite every block between its markers from its results folder
    python -m tdabench.dev.docs check [--readme README.md] [BLOCK ...]   (CI, after make run)
        exit 1 when a block's numbers differ from what its results folder gives now, or when a
        block's stale flag does not match whether the code changed since its results were made

A block's begin marker records the commit, config hash, code digest, numerics mode and CPU of
the run (from the run's `provenance.json`); those and timing lines are not compared, everything
else is, on any machine: under `numerics: portable` (the default) a study gives the same numbers
on any x86-64 CPU with AVX2, of any vendor, at any thread count (tdabench.numerics). A block whose results were
made by code other than this checkout's (the code digest differs) is flagged stale in the README
itself, with the command that refreshes it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tdabench.evaluate import headline, read_results


@dataclass(frozen=True)
class Row:
    label: str  # "{n}" is replaced by the mean number of components
    method: str
    variant: str | None = None
    k: str | None = None  # "max" / "min" of the run's projection dims


@dataclass(frozen=True)
class Block:
    name: str
    results: str  # results folder, relative to the repository
    command: str  # what produces the results folder
    columns: tuple[tuple[str, str, str], ...]  # (header, protocol table, setting)
    rows: tuple[Row, ...]


DEFAULT_ROWS = (
    Row("full gradient", "full"),
    Row("greedy selection (≈{n} components)", "greedy"),
    Row("best single component", "best_single"),
    Row("select-then-project k={k}", "select_then_project", "select_then_project", "max"),
    Row("projection sjlt k={k}", "projection", "sjlt", "max"),
    Row("projection blockwise_unnormalized k={k}", "projection", "blockwise_unnormalized", "max"),
    Row("projection sjlt k={k}", "projection", "sjlt", "min"),
    Row("BM25 over prompts", "bm25", "prompt"),
    Row("BM25 over prompt + response", "bm25", "prompt_response"),
    Row("chance", "chance"),
)
BLOCKS = {
    "default-study": Block(
        "default-study",
        "results",
        "make run",
        (
            ("paraphrased", "metrics", "paraphrased"),
            ("model-generated", "metrics", "model_generated"),
            ("paraphrased, BM25 top-10", "candidates", "paraphrased"),
            ("model-gen., BM25 top-10", "candidates", "model_generated"),
        ),
        DEFAULT_ROWS,
    ),
    "smollm2-study": Block(
        "smollm2-study",
        "runs/smollm2/results",
        "make smollm2",
        (
            ("paraphrased", "metrics", "paraphrased"),
            ("model-generated", "metrics", "model_generated"),
            ("paraphrased, BM25 top-10", "candidates", "paraphrased"),
        ),
        (
            Row("full gradient (exact)", "full"),
            Row("greedy selection (≈{n} components)", "greedy"),
            Row("best single component", "best_single"),
            Row("select-then-project k={k}", "select_then_project", "select_then_project", "max"),
            Row("projection sjlt k={k}", "projection", "sjlt", "max"),
            Row("projection blockwise k={k}", "projection", "blockwise", "max"),
            Row("BM25 over prompts", "bm25", "prompt"),
            Row("chance", "chance"),
        ),
    ),
}
BEGIN = re.compile(r"<!-- tdabench:begin (?P<name>[\w-]+)(?P<meta>[^>]*)-->\n")
END = "<!-- tdabench:end {name} -->"


def _fmt(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return ""
    if sd is None or sd != sd or sd == 0:
        return f"{value:.3f}"
    return f"{value:.3f} ± {sd:.3f}"


def _pick(head: pl.DataFrame, setting: str, row: Row, dims: list[int]) -> dict | None:
    t = head.filter((pl.col("setting") == setting) & (pl.col("method") == row.method))
    if row.variant is not None:
        t = t.filter(pl.col("variant") == row.variant)
    if row.k is not None:
        t = t.filter(pl.col("k") == (max(dims) if row.k == "max" else min(dims)))
    return t.row(0, named=True) if t.height else None


def study_facts(results: Path) -> str:
    """The sentence about the benchmark and the fine-tuned model, from the result files."""
    train = pl.read_parquet(results / "data" / "train.parquet")
    metrics = read_results(results / "evaluation" / "metrics.parquet")
    data = results / "data"
    queries = pl.read_parquet(
        data / "queries_all.parquet" if (data / "queries_all.parquet").exists() else data / "queries.parquet"
    )
    n_splits = metrics["split"].n_unique()
    held = int(metrics["n_queries"].max())
    roles = dict(train["role"].value_counts().iter_rows())
    per_setting = queries.group_by("setting").len()["len"].max()
    text = (
        f"{train.height} training examples ({roles.get('background', 0)} background, "
        f"{roles.get('planted', 0)} planted), "
        f"{per_setting} queries per setting, {held} of them held out for scoring in each of {n_splits} splits (the "
        "others choose components)."
    )
    report = results / "models" / "finetune_report.json"
    if report.exists():
        r = json.loads(report.read_text())
        if "planted_correct_train_prompt" in r:
            text += (
                f" The fine-tuned model states {r['planted_correct_train_prompt']} of the {roles.get('planted', 0)} "
                f"planted facts when asked the training question and {r['planted_correct_paraphrased_prompt']} when "
                "asked the paraphrase"
            )
            generated = queries.filter(pl.col("setting") == "model_generated")
            if "states_fact" in generated.columns and generated.height:
                text += (
                    f"; its own answers to the paraphrased prompts (the model-generated queries) state the fact in "
                    f"{100 * generated['states_fact'].mean():.1f}% of cases"
                )
            text += "."
    return text


def render_table(block: Block, results: Path) -> str:
    """Facts sentence and table of one block (no markers)."""
    tables = {p: read_results(results / "evaluation" / f"{p}.parquet") for p in ("metrics", "candidates")}
    heads = {p: headline(t) for p, t in tables.items() if not t.is_empty()}
    dims = sorted(set(tables["metrics"].filter(pl.col("k").is_not_null())["k"].to_list())) or [0]
    lines = [
        study_facts(results)
        + f" Top-1, mean ± sd over splits (projections: and seeds), from `{block.results}/summary.md`:",
        "",
        "| method | dim | " + " | ".join(c[0] for c in block.columns) + " |",
        "|---|---:|" + "---:|" * len(block.columns),
    ]
    for row in block.rows:
        picked = [_pick(heads[p], s, row, dims) if p in heads else None for _, p, s in block.columns]
        if not any(picked):
            continue
        corpus = [r for r, (_, p, _) in zip(picked, block.columns) if r and p == "metrics"]  # one per setting
        k = max(dims) if row.k == "max" else min(dims)
        label = row.label.format(n=" / ".join(f"{r['n_components']:.0f}" for r in corpus), k=k)
        corpus_dims = [int(r["dim"]) for r in corpus]
        if len(set(corpus_dims)) == 1:  # one value for every setting; else per setting, in column order
            corpus_dims = corpus_dims[:1]
        dim = " / ".join(f"{d:,}" for d in corpus_dims) if any(corpus_dims) else ""
        cells = [_fmt(r["top1"], r["top1_sd"]) if r else "" for r in picked]
        lines.append(f"| {label} | {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(results: Path) -> dict:
    path = results / "provenance.json"
    return json.loads(path.read_text()) if path.exists() else {}


def machine_meta(prov: dict) -> str:
    """' numerics=portable cpu=AuthenticAMD/AVX2' (the run's mode, CPU vendor and the kernel level
    torch ran), or '' for a run that recorded neither (before tdabench.numerics)."""
    env = prov.get("environment")
    if "numerics" not in prov or not env:
        return ""
    return f" numerics={prov['numerics']} cpu={env['cpu_vendor']}/{env['kernel_level']}"


def current_digest() -> str:
    from tdabench.pipeline.common import code_digest

    return code_digest()


def render_block(block: Block, root: Path) -> str:
    """The whole block, markers included."""
    results = root / block.results
    prov = provenance(results)
    meta = (
        f" commit={prov.get('commit', 'unknown')[:12]}{'-dirty' if prov.get('dirty') else ''} "
        f"config={prov.get('config_hash', '?')} code={prov.get('code_digest', '?')}{machine_meta(prov)} "
    )
    body = [f"<!-- tdabench:begin {block.name}{meta}-->"]
    if prov.get("code_digest") != current_digest():
        body += [
            f"> **Stale:** these numbers come from commit {prov.get('commit', 'unknown')[:12]}; the code they depend "
            f"on has changed since. Refresh with `{block.command} && make docs`.",
            "",
        ]
    body += [
        f"Generated by `make docs` from `{block.command}` (`{block.results}/`, commit "
        f"{prov.get('commit', 'unknown')[:12]}, config hash {prov.get('config_hash', '?')}); do not edit by hand.",
        "",
        render_table(block, results),
        END.format(name=block.name),
    ]
    return "\n".join(body)


def blocks_in(text: str) -> dict[str, tuple[int, int, str]]:
    """{name: (start, end, block text)} of the marked blocks in a document."""
    out = {}
    for m in BEGIN.finditer(text):
        end_marker = END.format(name=m["name"])
        stop = text.find(end_marker, m.end())
        if stop < 0:
            raise ValueError(f"block {m['name']}: no end marker {end_marker!r}")
        stop += len(end_marker)
        out[m["name"]] = (m.start(), stop, text[m.start() : stop])
    return out


def comparable(block_text: str) -> str:
    """What must match: the block without its begin marker (commit, hashes) and provenance line."""
    lines = block_text.splitlines()[1:]
    return "\n".join(line for line in lines if not line.startswith("Generated by `make docs`"))


# Figures the README shows, copied from a block's results when it is rendered.
FIGURES = {"default-study": [("evaluation/top1_vs_dim.png", "docs/images/top1_vs_dim.png")]}


def render(readme: Path, root: Path, names: list[str] | None = None) -> list[str]:
    """Rewrite the named blocks (default: every block whose results exist) and copy their figures.
    Returns what was rendered."""
    import shutil

    text = readme.read_text()
    done = []
    for name, (start, stop, _) in sorted(blocks_in(text).items(), key=lambda item: -item[1][0]):
        block = BLOCKS[name]
        if (names and name not in names) or not (root / block.results / "evaluation" / "metrics.parquet").exists():
            continue
        text = text[:start] + render_block(block, root) + text[stop:]
        for source, target in FIGURES.get(name, []):
            if (root / block.results / source).exists() and (root / target).parent.exists():
                shutil.copyfile(root / block.results / source, root / target)
        done.append(name)
    readme.write_text(text)
    return done


def check(readme: Path, root: Path, names: list[str]) -> list[str]:
    """Problems: a block whose numbers differ from what its results folder gives now."""
    problems = []
    found = blocks_in(readme.read_text())
    for name in names:
        if name not in found:
            problems.append(f"{readme}: no block {name}")
            continue
        block = BLOCKS[name]
        if not (root / block.results / "evaluation" / "metrics.parquet").exists():
            problems.append(f"{name}: no results in {block.results}/ (run `{block.command}` first)")
            continue
        want, got = comparable(render_block(block, root)), comparable(found[name][2])
        if want != got:
            diff = [f"  README: {g}\n  now:    {w}" for g, w in zip(got.splitlines(), want.splitlines()) if g != w]
            problems.append(
                f"{readme}: block {name} differs from {block.results}/ (`tdabench compare` against the run that "
                "rendered it names the stage where they part):\n" + "\n".join(diff[:5])
            )
    return problems


def check_stale_flags(readme: Path, skip: list[str] = ()) -> list[str]:
    """Blocks whose results are not checked here (e.g. the SmolLM2 study in CI): the stale flag
    must say whether the code changed since the run recorded in the marker."""
    problems = []
    digest = current_digest()
    for name, (_, _, text) in blocks_in(readme.read_text()).items():
        if name in skip:
            continue
        recorded = re.search(r"code=(\S+)", text.splitlines()[0])
        flagged = "**Stale:**" in text
        changed = recorded is None or recorded.group(1) != digest
        if changed and not flagged:
            problems.append(
                f"{readme}: block {name} comes from other code than this checkout's and is not flagged stale; "
                f"run `{BLOCKS[name].command} && make docs` (or `make docs` to flag it)"
            )
        if flagged and not changed:
            problems.append(f"{readme}: block {name} is flagged stale but its code is current; run `make docs`")
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tdabench.dev.docs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["render", "check"])
    parser.add_argument("blocks", nargs="*", help=f"of {', '.join(BLOCKS)} (default: all with results / default-study)")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--root", default=".", help="repository root the results folders are relative to")
    args = parser.parse_args(argv)
    readme, root = Path(args.readme), Path(args.root)
    if args.command == "render":
        done = render(readme, root, args.blocks or None)
        print(f"rendered {', '.join(done) or 'nothing'} into {readme}")
        problems = check_stale_flags(readme)
    else:
        names = args.blocks or ["default-study"]
        problems = check(readme, root, names) + check_stale_flags(readme, skip=names)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        raise SystemExit(1)
    if args.command == "check":
        print(f"{readme}: blocks {', '.join(names)} match their results; stale flags are right")


if __name__ == "__main__":
    main()
