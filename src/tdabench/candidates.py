"""The BM25 candidate sets of the published protocol, computed once and read by every stage that
ranks within them (`results/data/bm25_candidates.parquet`): the similarity store's candidate
layout (cached or streamed) and the evaluation's candidate protocol.

Per query: the top b training examples by BM25 of the query prompt over the training prompts
(tdabench.data.bm25, config `evaluation.bm25`; ties: the lower training row first), with the
source forced into the last slot when BM25 missed it. A query setting whose prompts equal another
setting's (model-generated queries answer the paraphrased prompts) gets the same sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from tdabench.data.bm25 import BM25Config, bm25_scores, top_candidates, top_ranked
from tdabench.errors import StudyError
from tdabench.io import read_parquet_checked, write_parquet

CANDIDATES_SCHEMA = {
    "setting": pl.Utf8,
    "query_id": pl.Utf8,
    "source_id": pl.Utf8,
    "slot": pl.Int64,  # 0 .. b-1, best first
    "train_id": pl.Utf8,
    "score": pl.Float64,  # BM25 score of this training example for this query
    "forced": pl.Boolean,  # the source, put into the last slot because BM25 ranked it lower
}


class CandidateError(StudyError, ValueError):
    """Candidate sets that cannot be built from these tables or do not fit the store asking."""


def build_candidates(
    train: pl.DataFrame, queries: pl.DataFrame, settings: Sequence[str], b: int, cfg: BM25Config
) -> pl.DataFrame:
    """The candidate table of every query of `settings` (columns CANDIDATES_SCHEMA)."""
    if b > train.height:
        raise CandidateError(
            f"config key evaluation.candidates is {b}, but the training set has {train.height} examples: "
            f"set it to at most {train.height}, or null for whole-corpus ranking only"
        )
    train_ids = train["id"].to_list()
    row_of = {t: i for i, t in enumerate(train_ids)}
    documents = train["prompt"].to_list()
    frames = []
    for setting in settings:
        q = queries.filter(pl.col("setting") == setting)
        missing = [(i, s) for i, s in zip(q["id"].to_list(), q["source_id"].to_list()) if s not in row_of]
        if missing:
            (qid, sid), more = missing[0], len(missing) - 1
            raise CandidateError(
                f"query {qid!r} (setting {setting}) has source_id {sid!r}, which is not a training example id"
                + (f" ({more} more such queries)" if more else "")
            )
        sources = np.array([row_of[s] for s in q["source_id"].to_list()], dtype=np.int64)  # [Q]
        scores = bm25_scores(query_texts(queries, q, setting, cfg.query), documents, cfg)  # [Q, T]
        order = top_candidates(scores, sources, b)  # [Q, b] training rows
        forced = np.zeros(order.shape, dtype=bool)
        forced[:, -1] = ~(top_ranked(scores, b) == sources[:, None]).any(1)
        n = q.height
        frames.append(
            pl.DataFrame(
                {
                    "setting": [setting] * (n * b),
                    "query_id": np.repeat(q["id"].to_numpy(), b),
                    "source_id": np.repeat(q["source_id"].to_numpy(), b),
                    "slot": np.tile(np.arange(b), n),
                    "train_id": np.asarray(train_ids, dtype=object)[order.ravel()],
                    "score": np.take_along_axis(scores, order, axis=1).ravel(),
                    "forced": forced.ravel(),
                },
                schema=CANDIDATES_SCHEMA,
            )
        )
    return pl.concat(frames) if frames else pl.DataFrame(schema=CANDIDATES_SCHEMA)


def query_texts(queries: pl.DataFrame, q: pl.DataFrame, setting: str, query: str) -> list[str]:
    """What BM25 is queried with for the queries `q` of `setting`: their own prompts, or (query
    paraphrased_prompt, the paper's) the prompt of the paraphrased query of the same source, so
    every setting gets the paraphrased setting's candidate sets."""
    if query == "prompt" or setting == "paraphrased":
        return q["prompt"].to_list()
    para = queries.filter(pl.col("setting") == "paraphrased")
    doubled = para.filter(pl.col("source_id").is_duplicated())["source_id"].unique().to_list()
    if doubled:
        raise CandidateError(
            f"config key evaluation.bm25.query: paraphrased_prompt, but source {doubled[0]!r} has several "
            "paraphrased queries: which prompt to use is ambiguous"
        )
    prompt_of = dict(zip(para["source_id"].to_list(), para["prompt"].to_list()))
    missing = [(i, s) for i, s in zip(q["id"].to_list(), q["source_id"].to_list()) if s not in prompt_of]
    if missing:
        (qid, sid), more = missing[0], len(missing) - 1
        raise CandidateError(
            f"config key evaluation.bm25.query: paraphrased_prompt, but query {qid!r} (setting {setting}) has "
            f"source {sid!r}, which no paraphrased query has" + (f" ({more} more such queries)" if more else "")
        )
    return [prompt_of[s] for s in q["source_id"].to_list()]


def write_candidates(table: pl.DataFrame, path: str | Path) -> None:
    write_parquet(table.select(list(CANDIDATES_SCHEMA)), path)


def read_candidates(path: str | Path) -> pl.DataFrame:
    return read_parquet_checked(path, CANDIDATES_SCHEMA, "BM25 candidate table")


def candidate_rows(
    table: pl.DataFrame, setting: str, query_ids: Sequence[str], train_ids: Sequence[str], where: str
) -> np.ndarray:
    """Training rows of each query's candidates, best first -> [Q, b] int64 (`where` names the
    file in errors). Every query must have slots 0..b-1 and every candidate must be a training id."""
    t = table.filter(pl.col("setting") == setting).sort("query_id", "slot")
    by_query = {qid: group for (qid,), group in t.group_by("query_id", maintain_order=True)}
    missing = [q for q in query_ids if q not in by_query]
    if missing:
        raise CandidateError(
            f"{where}: no candidates for query {missing[0]!r} of setting {setting} ({len(missing)} missing)"
        )
    sizes = {by_query[q].height for q in query_ids}
    if len(sizes) != 1:
        raise CandidateError(f"{where}: setting {setting} has candidate sets of sizes {sorted(sizes)}")
    b = sizes.pop()
    row_of = {t: i for i, t in enumerate(train_ids)}
    out = np.empty((len(query_ids), b), dtype=np.int64)
    for i, q in enumerate(query_ids):
        group = by_query[q]
        if group["slot"].to_list() != list(range(b)):
            raise CandidateError(f"{where}: query {q!r} of setting {setting} has slots {group['slot'].to_list()}")
        unknown = [c for c in group["train_id"].to_list() if c not in row_of]
        if unknown:
            raise CandidateError(f"{where}: candidate {unknown[0]!r} of query {q!r} is not a training example id")
        out[i] = [row_of[c] for c in group["train_id"].to_list()]
    return out


def check_candidates(table: pl.DataFrame) -> list[str]:
    """The table's invariants ([] when sound): one b for all, slots 0..b-1 per query, the source
    among each query's candidates, `forced` only on the last slot and only where it holds the source."""
    sets = (
        table.sort("setting", "query_id", "slot")
        .group_by("setting", "query_id", maintain_order=True)
        .agg(pl.col("slot"), pl.col("train_id"), pl.col("source_id").first(), pl.col("forced"))
    )
    problems = []
    sizes = sets["slot"].list.len().unique().to_list()
    if len(sizes) > 1:
        problems.append(f"candidate sets of sizes {sorted(sizes)} (one b expected)")
    for r in sets.iter_rows(named=True):
        where = f"query {r['query_id']!r} of setting {r['setting']}"
        if r["slot"] != list(range(len(r["slot"]))):
            problems.append(f"{where}: slots {r['slot']}")
        elif r["source_id"] not in r["train_id"]:
            problems.append(f"{where}: its source {r['source_id']!r} is not among its candidates")
        elif any(r["forced"][:-1]) or (r["forced"][-1] and r["train_id"][-1] != r["source_id"]):
            problems.append(f"{where}: forced marks a slot that is not the source in the last slot")
        if len(problems) >= 5:
            break
    return problems
