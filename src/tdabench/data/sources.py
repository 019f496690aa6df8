"""User data: JSONL / parquet files and Hugging Face datasets (hub name or local folder).

Schemas (after column mapping):
    train    id, prompt, response                      (optional: role = planted | background)
    queries  id, source_id, setting, prompt, response  (source_id: an id of the train table)
A Hugging Face dataset is read with `datasets.load_dataset` (a hub name, a folder of data files,
or a folder written by `Dataset.save_to_disk`), then its columns are renamed by the mapping
{our column: dataset column}. `messages: <column>` reads a chat-format column (a list of
{role, content}) instead: prompt and response are its user and assistant message (single-turn
rows only: a multi-turn row is an error). Query sets aligned row by row with the training set can
take `source: index` instead of a source_id column.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from tdabench.errors import StudyError

TRAIN_COLUMNS = ("id", "prompt", "response")
QUERY_COLUMNS = ("id", "source_id", "setting", "prompt", "response")


class DataError(StudyError, ValueError):
    """User data that cannot be used: names the file or config key and what is allowed."""


def read_table(path: str | Path, key: str) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError(f"config key {key}: file {path} does not exist")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path)
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    raise DataError(f"config key {key}: {path} must be .jsonl (JSON Lines) or .parquet")


def read_jsonl(path: Path) -> pl.DataFrame:
    """JSON Lines, one object per line (UTF-8, a byte-order mark allowed, blank lines skipped);
    a broken line is reported with its number."""
    import json

    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    try:
        return pl.DataFrame(rows, infer_schema_length=None)
    except Exception as e:  # noqa: BLE001 - mixed types in a column: name the file
        raise DataError(f"{path}: rows do not form a table ({e})") from None


ROLES = ("planted", "background", "train")


def check_columns(df: pl.DataFrame, required: tuple[str, ...], where: str) -> pl.DataFrame:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; required: {list(required)}, found: {df.columns}")
    if df.height == 0:
        raise DataError(f"{where}: no rows")
    out = df.with_columns(pl.col(c).cast(pl.Utf8) for c in required)
    empty = out.filter(pl.any_horizontal(pl.col(c).is_null() | (pl.col(c).str.strip_chars() == "") for c in required))
    if empty.height:
        first = empty.row(0, named=True)
        raise DataError(
            f"{where}: {empty.height} row(s) with an empty {'/'.join(required)} value, e.g. id {first.get('id')!r}"
        )
    if not out["id"].is_unique().all():
        dup = out.filter(pl.col("id").is_duplicated())["id"].unique().sort().to_list()
        raise DataError(f"{where}: column id has duplicate values, e.g. {dup[:3]}")
    if "role" in out.columns:
        unknown = sorted(set(out["role"].cast(pl.Utf8).drop_nulls()) - set(ROLES))
        if unknown or out["role"].null_count():
            raise DataError(f"{where}: column role has values {unknown or [None]}; allowed: {', '.join(ROLES)}")
    return out


def validate_pair(train: pl.DataFrame, queries: pl.DataFrame, where: str) -> None:
    unknown = sorted(set(queries["source_id"]) - set(train["id"]))
    if unknown:
        raise DataError(f"{where}: {len(unknown)} query source_id(s) are not training ids, e.g. {unknown[:3]}")


def load_files_train(path: str) -> pl.DataFrame:
    return with_role(check_columns(read_table(path, "dataset.files.train"), TRAIN_COLUMNS, path))


def load_files(train_path: str, queries_path: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    train = load_files_train(train_path)
    queries = check_columns(read_table(queries_path, "dataset.files.queries"), QUERY_COLUMNS, queries_path)
    validate_pair(train, queries, queries_path)
    return train, queries


def with_role(train: pl.DataFrame) -> pl.DataFrame:
    return train if "role" in train.columns else train.with_columns(pl.lit("train").alias("role"))


def load_hf(spec: dict, key: str) -> pl.DataFrame:
    """One split of a Hugging Face dataset as a polars table, columns mapped to ours."""
    from datasets import load_dataset, load_from_disk

    path = spec["path"]
    local = Path(path)
    try:
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            data = load_from_disk(str(local))  # written by save_to_disk
            data = data[spec.get("split", "train")] if hasattr(data, "keys") else data
        else:
            data = load_dataset(path, spec.get("name"), split=spec.get("split", "train"))
    except Exception as e:  # noqa: BLE001 - the datasets library raises many kinds; name the key
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (
            f" The Hugging Face hub is offline (HF_HUB_OFFLINE=1) and the dataset is not in its cache: fetch "
            f"it once with `HF_HUB_OFFLINE=0 hf download --repo-type dataset {path}` (or run this job "
            "once with HF_HUB_OFFLINE=0), or point the key to a local folder."
            if offline and not local.exists()
            else ""
        )
        raise DataError(f"config key {key}.path: cannot load {path!r} ({type(e).__name__}: {e}).{hint}") from None
    table = pl.from_arrow(data.data.table) if hasattr(data, "data") else pl.DataFrame(data.to_dict())
    mapping = spec.get("columns") or {}
    missing = [col for col in mapping.values() if col not in table.columns]
    if missing:
        raise DataError(f"config key {key}.columns: {path} has no column(s) {missing}; it has {table.columns}")
    if not mapping:
        return table
    for ours, src in mapping.items():  # text columns must hold text (or numbers, for ids)
        dtype = table.schema[src]
        if ours != "messages" and (dtype.is_nested() or dtype == pl.Object):
            raise DataError(
                f"config key {key}.columns.{ours}: column {src!r} of {path} holds {dtype}, not text; map "
                f"{ours} to a text column" + (" (a chat column goes under messages)" if ours != "id" else "")
            )
    out = table.select(pl.col(src).alias(ours) for ours, src in mapping.items() if ours != "messages")
    if "messages" in mapping:  # a chat column: prompt and response from its single user / assistant turn
        pairs = [
            single_turn(m, f"config key {key}.columns.messages ({path}, row {i})")
            for i, m in enumerate(table[mapping["messages"]].to_list())
        ]
        out = out.with_columns(
            pl.Series("prompt", [p for p, _ in pairs], pl.Utf8), pl.Series("response", [r for _, r in pairs], pl.Utf8)
        )
    return out


def single_turn(messages: list[dict] | None, where: str) -> tuple[str, str]:
    """(user content, assistant content) of a single-turn chat-format example
    ([{"role": "user", "content": ...}, {"role": "assistant", "content": ...}], a system message
    allowed). A multi-turn conversation is an error: the study attributes one prompt and answer."""
    turns: dict[str, list[str]] = {}
    for message in messages or []:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: expected a list of {{role, content}} messages, got {message!r:.80}")
        turns.setdefault(message["role"], []).append(message["content"])
    if "user" not in turns or "assistant" not in turns:
        raise DataError(f"{where}: needs a user and an assistant message, has roles {sorted(turns)}")
    if len(turns["user"]) > 1 or len(turns["assistant"]) > 1:
        raise DataError(
            f"{where}: a multi-turn conversation ({len(turns['user'])} user and {len(turns['assistant'])} "
            "assistant messages); the study attributes single-turn examples: keep only rows with one user "
            "and one assistant message"
        )
    return turns["user"][0], turns["assistant"][0]


def load_huggingface_train(spec: dict) -> pl.DataFrame:
    """The training set of `dataset.huggingface.train` (ids: row numbers when it has none)."""
    key = "dataset.huggingface.train"
    train = load_hf(spec, key)
    if "id" not in train.columns:
        train = train.with_columns(pl.format("t{}", pl.int_range(pl.len()).cast(pl.Utf8).str.zfill(5)).alias("id"))
    return with_role(check_columns(train, TRAIN_COLUMNS, f"{key} ({spec['path']})"))


def load_huggingface(train_spec: dict, query_specs: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame]:
    key = "dataset.huggingface"
    train = load_huggingface_train(train_spec)
    parts = []
    for i, spec in enumerate(query_specs):
        where = f"{key}.queries[{i}]"
        q = load_hf(spec, where)
        if spec.get("source") == "index":
            if q.height != train.height:
                raise DataError(
                    f"config key {where}.source: 'index' needs as many queries as training rows "
                    f"({q.height} vs {train.height})"
                )
            q = q.with_columns(train["id"].alias("source_id"))
        if "id" not in q.columns:
            q = q.with_columns(pl.format(f"q{i}_{{}}", pl.int_range(pl.len()).cast(pl.Utf8).str.zfill(5)).alias("id"))
        q = q.with_columns(pl.lit(spec["setting"]).alias("setting"))
        parts.append(check_columns(q, QUERY_COLUMNS, f"{where} ({spec['path']})"))
    queries = pl.concat([p.select(QUERY_COLUMNS) for p in parts])
    validate_pair(train, queries, f"{key}.queries")
    return train, queries


# The benchmark tables every later stage reads (results/data/{train,queries,queries_all}.parquet):
# the columns above (train also `role`), plus whatever the source brought (e.g. the synthetic
# generator's `value`, model-generated queries' `states_fact`).
def _write(df: pl.DataFrame, path: str | Path, required: tuple[str, ...]) -> None:
    from tdabench.io import write_parquet

    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: refusing to write a table without column(s) {missing}")
    write_parquet(df, path)


def _read(path: str | Path, required: tuple[str, ...]) -> pl.DataFrame:
    from tdabench.io import read_parquet

    df = read_parquet(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a tdabench benchmark table (missing column(s) {missing})")
    return df


def write_train(df: pl.DataFrame, path: str | Path) -> None:
    _write(df, path, (*TRAIN_COLUMNS, "role"))


def read_train(path: str | Path) -> pl.DataFrame:
    return _read(path, (*TRAIN_COLUMNS, "role"))


def write_queries(df: pl.DataFrame, path: str | Path) -> None:
    _write(df, path, QUERY_COLUMNS)


def read_queries(path: str | Path) -> pl.DataFrame:
    return _read(path, QUERY_COLUMNS)


def read_setting_queries(path: str | Path, setting: str) -> tuple[pl.DataFrame, np.ndarray]:
    """The whole query table and the rows of `setting` in it (increasing)."""
    everything = read_queries(path)
    rows = np.flatnonzero((everything["setting"] == setting).to_numpy())
    if len(rows) == 0:
        raise ValueError(
            f"no queries of setting {setting!r} in {path} (it has {sorted(set(everything['setting']))}); "
            "fix config key dataset.settings or the query data"
        )
    return everything, rows
