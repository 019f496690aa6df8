"""The workflow on a user's own data: JSONL files, and a local Hugging Face dataset folder with a
local model checkpoint (no hub access: HF_HUB_OFFLINE=1 in every job)."""

import json

import polars as pl
import pytest

from tdabench.data.synthetic import SyntheticConfig, generate

from workflow_helpers import copy_repo, planned, snakemake, write_config

pytestmark = pytest.mark.workflow

FAST = {  # the smallest study that still runs every stage
    "model": {"tiny": {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "num_layers": 2, "num_heads": 2}},
    "tokenize": {"max_length": 64},
    "pretrain": {"epochs": 1, "batch_size": 8},
    "finetune": {"epochs": 1, "batch_size": 8},
    "gradients": {"components": ["up", "down", "lm_head"], "batch_size": 16},
    "selection": {"n_splits": 1, "budgets": [0.5]},
    "projection": {"methods": ["sjlt"], "dims": [8], "seeds": [0]},
    "evaluation": {"bootstrap": 100, "cost_samples": 4, "candidates": 5},
    "mlflow": {"enabled": False},  # MLflow is checked in test_workflow; here it would only add time
}


def user_tables():
    """A small benchmark in the user schema: free-form ids, no extra columns."""
    train, queries = generate(SyntheticConfig(n_entities=10, background_facts_per_entity=2, planted_facts=12, seed=3))
    rename = {old: f"ex-{i}" for i, old in enumerate(train["id"].to_list())}
    train = train.select(pl.col("id").replace_strict(rename), "prompt", "response")
    queries = queries.select("id", pl.col("source_id").replace_strict(rename), "setting", "prompt", "response")
    return train, queries


def write_jsonl(df: pl.DataFrame, path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in df.iter_rows(named=True)))


def test_jsonl_files_run_end_to_end(tmp_path):
    root = copy_repo(tmp_path / "study")
    train, queries = user_tables()
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(queries, tmp_path / "queries.jsonl")

    bad = train.drop("response")  # a clear error naming the file and the column; nothing written
    write_jsonl(bad, tmp_path / "bad.jsonl")
    data = {
        "kind": "files",
        "settings": ["paraphrased"],
        "files": {"train": str(tmp_path / "bad.jsonl"), "queries": str(tmp_path / "queries.jsonl")},
    }
    write_config(root, {**FAST, "dataset": data})
    r = snakemake(root, check=False)
    assert r.returncode != 0
    log = (root / "logs/background.log").read_text()
    assert "bad.jsonl" in log and "missing column(s) ['response']" in log
    assert str(root / "src" / "tdabench" / "data" / "sources.py") in log  # the copy's library ran, not another
    assert not (root / "results/data").exists() or not any((root / "results/data").iterdir())

    data["files"]["train"] = str(tmp_path / "train.jsonl")
    write_config(root, {**FAST, "dataset": data})
    snakemake(root)
    got = pl.read_parquet(root / "results/data/train.parquet")
    assert got["id"].to_list() == train["id"].to_list()
    assert pl.read_parquet(root / "results/data/background.parquet").height == train.height  # no role column
    metrics = pl.read_parquet(root / "results/evaluation/metrics.parquet")
    assert set(metrics["setting"]) == {"paraphrased"} and (metrics["n_train"] == train.height).all()
    candidates = pl.read_parquet(root / "results/evaluation/candidates.parquet")
    assert set(candidates["b"]) == {5} and "full" in set(candidates["method"])
    # A data file edited in place reruns what reads it (the file is a rule input, not only a param).
    assert planned(root) == {}
    edited = train.with_columns(
        pl.when(pl.col("id") == train["id"][0]).then(pl.lit("edited")).otherwise("response").alias("response")
    )
    write_jsonl(edited, tmp_path / "train.jsonl")
    assert {"background", "dataset", "finetune", "evaluate", "summary"} <= set(planned(root))


def test_local_hugging_face_dataset_and_local_model(tmp_path):
    datasets = pytest.importorskip("datasets")
    from tdabench.models import TinyModelConfig, build_tiny_model, train_tokenizer

    root = copy_repo(tmp_path / "study")
    train, queries = user_tables()
    # The training set with other column names, no id column (ids become row numbers) ...
    datasets.Dataset.from_dict(
        {"instruction": train["prompt"].to_list(), "output": train["response"].to_list()}
    ).save_to_disk(str(tmp_path / "hf_train"))
    # ... and queries in chat format, row-aligned with their sources (like the published LIMA sets).
    source_row = {i: n for n, i in enumerate(train["id"].to_list())}
    aligned = [None] * train.height
    for q in queries.iter_rows(named=True):
        aligned[source_row[q["source_id"]]] = q
    keep = [i for i, q in enumerate(aligned) if q is not None]
    datasets.Dataset.from_dict(
        {
            "uid": [f"t{i:05d}" for i in keep],
            "chat": [
                [
                    {"role": "user", "content": aligned[i]["prompt"]},
                    {"role": "assistant", "content": aligned[i]["response"]},
                ]
                for i in keep
            ],
        }
    ).save_to_disk(str(tmp_path / "hf_queries"))
    # A user's local checkpoint: a tiny Llama with a locally trained tokenizer.
    tokenizer = train_tokenizer(train["prompt"].to_list() + train["response"].to_list(), 300)
    model = build_tiny_model(TinyModelConfig(**FAST["model"]["tiny"]), tokenizer, seed=0, max_positions=96)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    data = {
        "kind": "huggingface",
        "settings": ["paraphrased"],
        "huggingface": {
            "train": {"path": str(tmp_path / "hf_train"), "columns": {"prompt": "instruction", "response": "output"}},
            "queries": [
                {
                    "path": str(tmp_path / "hf_queries"),
                    "setting": "paraphrased",
                    "columns": {"source_id": "uid", "messages": "chat"},
                }
            ],
        },
    }
    # The published setting: the model already saw the data, so it is attributed as it is.
    write_config(
        root,
        {
            **FAST,
            "dataset": data,
            "finetune": {"enabled": False},
            "model": {"kind": "huggingface", "name_or_path": str(tmp_path / "model")},
        },
    )
    snakemake(root)
    assert not (root / "results/models").exists()  # a given checkpoint is neither pre-trained nor fine-tuned
    got = pl.read_parquet(root / "results/data/queries.parquet")
    assert got.height == queries.height and set(got["setting"]) == {"paraphrased"}
    want = queries.with_columns(
        pl.col("source_id").replace_strict({i: f"t{n:05d}" for i, n in source_row.items()})
    ).sort("source_id")
    got = got.sort("source_id")
    assert got["source_id"].to_list() == want["source_id"].to_list()
    assert got["prompt"].to_list() == want["prompt"].to_list()
    metrics = pl.read_parquet(root / "results/evaluation/metrics.parquet")
    assert set(metrics["setting"]) == {"paraphrased"} and (metrics["n_train"] == train.height).all()
