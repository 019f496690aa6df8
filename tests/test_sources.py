"""User data readers: schemas, chat-format columns, clear errors (no hub access)."""

import json

import polars as pl
import pytest

from tdabench.data.sources import DataError, load_files, load_hf, single_turn
from tdabench.errors import ModelError
from tdabench.models import load_model


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_files_round_trip_and_unknown_source_is_named(tmp_path):
    write_jsonl(
        [{"id": "a", "prompt": "p1", "response": "r1"}, {"id": "b", "prompt": "p2", "response": "r2"}],
        tmp_path / "train.jsonl",
    )
    write_jsonl(
        [{"id": "q", "source_id": "b", "setting": "paraphrased", "prompt": "x", "response": "y"}], tmp_path / "q.jsonl"
    )
    train, queries = load_files(str(tmp_path / "train.jsonl"), str(tmp_path / "q.jsonl"))
    assert train["id"].to_list() == ["a", "b"] and set(train["role"]) == {"train"}
    assert queries["source_id"].to_list() == ["b"]
    write_jsonl(
        [{"id": "q", "source_id": "zz", "setting": "paraphrased", "prompt": "x", "response": "y"}],
        tmp_path / "bad.jsonl",
    )
    with pytest.raises(DataError, match=r"bad.jsonl: 1 query source_id\(s\) are not training ids, e.g. \['zz'\]"):
        load_files(str(tmp_path / "train.jsonl"), str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl, line 1: not valid JSON"):
        load_files(str(tmp_path / "broken.jsonl"), str(tmp_path / "q.jsonl"))
    with pytest.raises(DataError, match="dataset.files.train: file .*missing.jsonl does not exist"):
        load_files(str(tmp_path / "missing.jsonl"), str(tmp_path / "q.jsonl"))


def test_chat_columns_give_the_user_and_assistant_turn_and_refuse_multi_turn_rows():
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
    ]
    assert single_turn(chat, "here") == ("u1", "a1")
    with pytest.raises(DataError, match="here: needs a user and an assistant message, has roles \\['user'\\]"):
        single_turn([{"role": "user", "content": "u"}], "here")
    with pytest.raises(
        DataError, match="here: a multi-turn conversation .2 user and 1 assistant messages.; .*single-turn"
    ):
        single_turn([*chat, {"role": "user", "content": "u2"}], "here")


def test_local_saved_dataset_with_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"q": ["p1", "p2"], "a": ["r1", "r2"]}).save_to_disk(str(tmp_path / "d"))
    table = load_hf({"path": str(tmp_path / "d"), "columns": {"prompt": "q", "response": "a"}}, "k")
    assert table.equals(pl.DataFrame({"prompt": ["p1", "p2"], "response": ["r1", "r2"]}))
    with pytest.raises(DataError, match=r"config key k.columns: .* has no column\(s\) \['nope'\]; it has \['q', 'a'\]"):
        load_hf({"path": str(tmp_path / "d"), "columns": {"prompt": "nope"}}, "k")
    datasets.Dataset.from_dict({"q": [["p1", "x"], ["p2"]], "a": ["r1", "r2"]}).save_to_disk(str(tmp_path / "l"))
    with pytest.raises(
        DataError, match=r"config key k.columns.prompt: column 'q' of .* holds List\(String\), not text"
    ):
        load_hf({"path": str(tmp_path / "l"), "columns": {"prompt": "q", "response": "a"}}, "k")


def test_hub_names_fail_clearly_offline(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_hf({"path": "lukashinterleitner/LIMA-original"}, "dataset.huggingface.train")
    message = str(e.value)  # one line: the key, the dataset, and how to fetch it once
    assert "\n" not in message and message.startswith(
        "config key dataset.huggingface.train.path: cannot load 'lukashinterleitner/LIMA-original'"
    )
    assert "HF_HUB_OFFLINE=0 hf download --repo-type dataset lukashinterleitner/LIMA-original" in message
    with pytest.raises(ModelError, match="(?s)cannot load the model 'amd/AMD-OLMo-1B-SFT'.*HF_HUB_OFFLINE=1"):
        load_model("amd/AMD-OLMo-1B-SFT")
