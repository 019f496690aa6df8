"""Nothing wrong passes as a result: bad inputs and runtime faults across config, data, model,
stores, CLI and jobs. Each case fails (an exception, or a non-zero exit for commands) with a
message naming the culprit, and leaves no file a later step would trust."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import torch

from tdabench.components import describe
from tdabench.config import ConfigError, load_config, validate_config
from tdabench.data.sources import DataError, load_files
from tdabench.errors import ModelError
from tdabench.integrity import CorruptFileError, verify_hdf5
from tdabench.models import NotCausalError, load_model
from tdabench.pipeline.common import JobContext, run_rule
from tdabench.projection_files import ProjectionWriter, read_projections
from tdabench.similarity import load_similarity
from tdabench.store import GradientStore, GradientStoreWriter, NonFiniteGradientError, StoreWriteError

from helpers import random_store, similarity_from_gradients

CLI = str(Path(sys.executable).with_name("tdabench"))
NAME = "model.layers.0.mlp.down_proj.weight"


def no_files(folder: Path, pattern: str = "*") -> bool:
    return not any(folder.glob(pattern))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "config,message",
    [
        ({"finetune": {"learning_rate": float("inf")}}, r"finetune.learning_rate = inf: not a finite number"),
        ({"pretrain": {"learning_rate": float("nan")}}, r"pretrain.learning_rate = nan: not a finite number"),
        ({"finetune": {"learning_rate": "5e-3"}}, r"finetune.learning_rate: '5e-3' .*YAML 1.1 reads 5e-3 as a string"),
        ({"finetune": {"epochs": 2.5}}, r"finetune.epochs: 2.5 is not of type 'integer'"),
        ({"gradients": {"shards": 10_000}}, r"gradients.shards: 10000 shards for only 400 training examples"),
        ({"projection": {"dims": [10**9]}}, r"projection.dims\[0\]: k=1000000000 is larger than the full gradient"),
        ({"tokenize": {"max_length": 4}}, r"tokenize.max_length: 4 is less than the minimum of 8"),
        ({"gradients": {"verify_tolerance": 0}}, r"gradients.verify_tolerance"),
        ({"dataset": {"kind": "files"}}, r"dataset.files: kind files needs dataset.files.train"),
        ({"selection": {"objective": "accuracy"}}, r"selection.objective: 'accuracy' is not one of"),
        (
            {"evaluation": {"bm25": {"variant": "bm42"}}},
            r"evaluation.bm25.variant: 'bm42' is not one of \['lucene', 'okapi'\]",
        ),
        ({"tokenize": {"max_length": None}}, r"tokenize.max_length: null .no truncation. needs a model with its own"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_integral_float_counts_are_taken_as_integers():
    assert validate_config({"finetune": {"epochs": 2.0}})["finetune"]["epochs"] == 2


def test_a_key_given_twice_in_a_config_file_is_refused_with_both_lines(tmp_path):
    (tmp_path / "dup.yaml").write_text("seed: 1\nprojection:\n  dims: [8]\n  seeds: [0]\n  dims: [16]\n")
    with pytest.raises(ConfigError, match=r"dup.yaml, line 5: key 'dims' is given twice \(first at line 3\)"):
        load_config(tmp_path / "dup.yaml")
    (tmp_path / "ok.yaml").write_text("projection:\n  dims: [8]\nselection:\n  dims_unused: 1\n")  # no repeat
    with pytest.raises(ConfigError, match="selection.dims_unused"):  # an unknown key, but not a repeated one
        load_config(tmp_path / "ok.yaml")


def test_config_files_missing_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("seed: 1\nfinetune:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 4, column 1: not valid YAML \(expected the node content"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of config keys, got list"):
        load_config(tmp_path / "list.yaml")


# ---------------------------------------------------------------- data files


def write_lines(path: Path, lines: list[str], bom: bool = False) -> str:
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def good_pair(tmp_path: Path, train_rows=None, bom=False):
    train_rows = train_rows or [
        {"id": "a", "prompt": "p", "response": "r"},
        {"id": "b", "prompt": "q", "response": "s"},
    ]
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in train_rows], bom=bom)
    q = {"id": "q1", "source_id": "a", "setting": "paraphrased", "prompt": "p?", "response": "r"}
    queries = write_lines(tmp_path / "queries.jsonl", [json.dumps(q)])
    return train, queries


def test_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    train, _ = load_files(*good_pair(tmp_path, bom=True))
    assert train["id"].to_list() == ["a", "b"]


@pytest.mark.parametrize(
    "lines,message",
    [
        (
            ['{"id": "a", "prompt": "p", "response": "r"}', '{"id": "b", "prompt": '],
            r"train.jsonl, line 2: not valid JSON",
        ),
        (['{"id": "a", "prompt": "p", "response": "r"}', "[1, 2]"], r"train.jsonl, line 2: expected a JSON object"),
        (['{"id": "a", "prompt": "", "response": "r"}'], r"empty id/prompt/response value, e.g. id 'a'"),
        (['{"id": "a", "prompt": "p", "response": "   "}'], r"empty id/prompt/response value, e.g. id 'a'"),
        (
            ['{"id": "a", "prompt": "p", "response": "r", "role": "gold"}'],
            r"column role has values \['gold'\]; allowed: planted, background, train",
        ),
        (
            ['{"id": "a", "prompt": "p", "response": "r"}', '{"id": "a", "prompt": "q", "response": "s"}'],
            r"column id has duplicate values, e.g. \['a'\]",
        ),
        (['{"id": "a", "prompt": "p"}'], r"missing column\(s\) \['response'\]"),
        ([""], r"train.jsonl: no rows"),
    ],
)
def test_bad_training_files_name_file_line_and_column(tmp_path, lines, message):
    _, queries = good_pair(tmp_path)
    train = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_files(train, queries)


def test_non_utf8_file_is_named(tmp_path):
    _, queries = good_pair(tmp_path)
    (tmp_path / "latin.jsonl").write_bytes('{"id": "a", "prompt": "caf\xe9", "response": "r"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl: not UTF-8"):
        load_files(str(tmp_path / "latin.jsonl"), queries)


# ---------------------------------------------------------------- models


def save_tiny(tmp_path, config) -> str:
    from tokenizers import Tokenizer, models
    from transformers import AutoModel, PreTrainedTokenizerFast

    model = AutoModel.from_config(config)  # saved as its authors save it (a causal-LM class rewrites the config)
    folder = tmp_path / config.model_type
    model.save_pretrained(folder)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, "[UNK]")))
    tok.pad_token = tok.eos_token = "[UNK]"
    tok.save_pretrained(folder)
    return str(folder)


def test_bidirectional_encoder_is_refused(tmp_path):
    from transformers import BertConfig

    path = save_tiny(
        tmp_path,
        BertConfig(
            vocab_size=8,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            max_position_embeddings=16,
        ),
    )
    with pytest.raises(NotCausalError, match=r"bert\) is a bidirectional encoder"):
        load_model(path)


def test_encoder_decoder_is_refused(tmp_path):
    from transformers import BartConfig

    cfg = BartConfig(
        vocab_size=8,
        d_model=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=8,
        decoder_ffn_dim=8,
        max_position_embeddings=16,
    )
    with pytest.raises(NotCausalError, match=r"bart\) is an encoder-decoder"):
        load_model(save_tiny(tmp_path, cfg))


def tiny_llama_folder(tmp_path) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    return Path(save_tiny(tmp_path, cfg))


def test_a_corrupt_weights_file_is_named_with_what_to_do(tmp_path):
    folder = tiny_llama_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated by a failed copy
    with pytest.raises(
        ModelError, match=r"cannot read the weights of model '.*llama'.*save or download the model again"
    ):
        load_model(str(folder))


def test_a_model_folder_without_a_tokenizer_is_named(tmp_path):
    folder = tiny_llama_folder(tmp_path)
    for f in folder.glob("*token*"):
        f.unlink()
    with pytest.raises(ModelError, match=r"model '.*llama' has no usable tokenizer .*tokenizer.save_pretrained"):
        load_model(str(folder))


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"cannot load the model .*no-model"):
        load_model(str(tmp_path / "no-model"))


# ---------------------------------------------------------------- gradient stores


def writer(path, n=6, dim=5, dtype="float32"):
    return GradientStoreWriter(
        path, [f"s{i}" for i in range(n)], [describe(NAME, (dim,))], dtype, {"model_fingerprint": "t"}
    )


def test_nan_gradient_row_is_refused_naming_sample_and_component(tmp_path):
    rows = np.ones((3, 5), np.float32)
    rows[1, 2] = np.nan
    with (
        pytest.raises(NonFiniteGradientError, match=rf"component {NAME} for sample\(s\) \['s1'\]"),
        writer(tmp_path / "g.h5") as w,
    ):
        w.write(slice(0, 3), {NAME: rows})
    assert not (tmp_path / "g.h5").exists()


def test_float16_overflow_is_refused(tmp_path):
    with (
        pytest.raises(NonFiniteGradientError, match=r"stored as float16: the values overflow it"),
        writer(tmp_path / "g.h5", dtype="float16") as w,
    ):
        w.write(slice(0, 2), {NAME: np.full((2, 5), 1e6, np.float32)})
    assert not (tmp_path / "g.h5").exists()


def test_rows_of_the_wrong_shape_are_refused(tmp_path):
    with (
        pytest.raises(ValueError, match=r"rows have shape \(2, 4\), expected \(2, 5\)"),
        writer(tmp_path / "g.h5") as w,
    ):
        w.write(slice(0, 2), {NAME: np.ones((2, 4), np.float32)})
    assert not (tmp_path / "g.h5").exists()


def test_a_write_error_mid_store_fails_with_the_path_and_nothing_is_renamed(tmp_path, monkeypatch):
    """A disk that fills up after the first batch (injected ENOSPC on the third dataset write)."""
    calls = {"n": 0}
    original = h5py.Dataset.__setitem__

    def full_disk(self, key, value):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full_disk)
    with pytest.raises(StoreWriteError, match=r"\.g\.h5\.partial: writing rows 3-5 failed .*No space left"):
        with writer(tmp_path / "g.h5") as w:
            w.write(slice(0, 3), {NAME: np.ones((3, 5), np.float32)})
            w.write(slice(3, 6), {NAME: np.ones((3, 5), np.float32)})
    assert not (tmp_path / "g.h5").exists()
    with h5py.File(tmp_path / ".g.h5.partial") as f:  # only the first batch counts as done
        assert f["done"][:].tolist() == [True] * 3 + [False] * 3


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    from tdabench.components import describe
    from tdabench.io import write_parquet
    import polars as pl
    if sys.argv[1] == "store":
        from tdabench.store import GradientStoreWriter
        c = describe("model.layers.0.mlp.down_proj.weight", (4000,))
        with GradientStoreWriter(sys.argv[2], [f"s{i}" for i in range(100)], [c], "float32", {}) as w:
            w.write(slice(0, 100), {c.name: np.ones((100, 4000), np.float32)})
    elif sys.argv[1] == "similarity":
        from tdabench.similarity import Header, SimilarityWriter
        c, t = [f"c{i}" for i in range(30)], [f"t{i}" for i in range(500)]
        cols = (c, [4] * 30, c, [0] * 30, [4] * 30, ["exact"] * 30, ["cache"] * 30)
        h = Header(*cols, ["q0", "q1"], t, np.arange(2), None, {})
        with SimilarityWriter(sys.argv[2], h, 2) as w:  # 240 kB of dot products: the second unit fails
            for u in range(2):
                sq = np.ones((30, 500))
                w.write(u, slice(u, u + 1), np.ones((30, 1, 500)), train_rows=slice(0, 500), train_sqnorm=sq)
    else:
        write_parquet(pl.DataFrame({"x": np.random.default_rng(0).random(200_000)}), sys.argv[2])
    """
)


@pytest.mark.parametrize("kind,name", [("store", "g.h5"), ("table", "t.parquet"), ("similarity", "s.h5")])
def test_a_full_disk_fails_the_write_with_the_path(tmp_path, kind, name):
    r = subprocess.run([sys.executable, "-c", FULL_DISK, kind, str(tmp_path / name)], capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.splitlines()[-1]
    assert f"{name}" in last and ("File too large" in last or "is the disk full" in last), r.stderr[-2000:]
    assert not (tmp_path / name).exists()  # never renamed into place


def test_a_flipped_byte_in_a_shard_stops_the_reader_and_verify_names_it(tmp_path):
    random_store(tmp_path / "g.h5", [f"s{i}" for i in range(8)], [6, 4])
    with h5py.File(tmp_path / "g.h5") as f:
        offset = f["grads"][NAME].id.get_chunk_info(0).byte_offset
    with open(tmp_path / "g.h5", "r+b") as fh:  # one bit of one float
        fh.seek(offset + 5)
        byte = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([byte[0] ^ 0x10]))
    with GradientStore(tmp_path / "g.h5") as store:
        with pytest.raises(CorruptFileError, match=rf"g.h5: dataset grads/{NAME} does not match its checksum.*--force"):
            list(store.iter_blocks(NAME, 3))
        with pytest.raises(CorruptFileError, match="does not match its checksum"):
            store.read(NAME)
    assert any("does not match its checksum" in p for p in verify_hdf5(tmp_path / "g.h5"))


def test_a_truncated_shard_is_named_with_its_rebuild_command(tmp_path):
    random_store(tmp_path / "g.h5", [f"s{i}" for i in range(8)], [6, 4])
    data = (tmp_path / "g.h5").read_bytes()
    (tmp_path / "g.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CorruptFileError, match=r"g.h5: unreadable or truncated HDF5 file .*snakemake --cores all --force"
    ):
        GradientStore(tmp_path / "g.h5")


def test_a_partial_file_with_a_nan_row_marked_done_is_not_resumed(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    c = describe(NAME, (5,))
    with pytest.raises(KeyboardInterrupt), GradientStoreWriter(tmp_path / "g.h5", ids, [c], "float32", {}) as w:
        w.write(slice(0, 3), {NAME: np.ones((3, 5), np.float32)})
        raise KeyboardInterrupt  # killed after the first batch
    with h5py.File(tmp_path / ".g.h5.partial", "r+") as f:  # rot: a done row went NaN on disk
        f["grads"][NAME][1] = np.nan
    with GradientStoreWriter(tmp_path / "g.h5", ids, [c], "float32", {}) as w:
        assert not w.done.any()  # started over instead of resuming
        w.write(slice(0, 6), {NAME: np.full((6, 5), 2.0, np.float32)})
    with GradientStore(tmp_path / "g.h5") as store:
        assert (store.read(NAME) == 2.0).all()


def test_an_incomplete_store_is_refused(tmp_path):
    random_store(tmp_path / "g.h5", [f"s{i}" for i in range(4)], [3])
    with h5py.File(tmp_path / "g.h5", "r+") as f:
        f["done"][2] = False
    with pytest.raises(CorruptFileError, match=r"g.h5: incomplete store \(not every row is done\)"):
        GradientStore(tmp_path / "g.h5")


# ---------------------------------------------------------------- similarity and projection stores


def similarity_file(path: Path, **change) -> str:
    """A valid dense similarity store written with plain h5py (as other code would), then `change`."""
    rng = np.random.default_rng(0)
    qg, tg = [rng.standard_normal((4, 3)) for _ in range(2)], [rng.standard_normal((6, 3)) for _ in range(2)]
    sim = similarity_from_gradients(qg, tg, [0, 1, 2, 3])
    data = {
        "components": np.array(sim.components, dtype="S"),
        "component_params": sim.component_params,
        "query_ids": np.array(sim.query_ids, dtype="S"),
        "train_ids": np.array(sim.train_ids, dtype="S"),
        "ground_truth": sim.ground_truth,
        "query_sqnorm": sim.query_sqnorm,
        "train_sqnorm": sim.train_sqnorm,
        "dot": sim.dot,
    }
    data.update(change)
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f[key] = value
    return str(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"ground_truth": np.array([0, 1, -1, 3])}, r"dataset ground_truth holds indices outside \[0, 6\)"),
        ({"ground_truth": np.array([0, 1, 2, 6])}, r"dataset ground_truth holds indices outside"),
        ({"dot": np.full((2, 4, 6), np.nan)}, r"sim.h5: non-finite values in dot"),
        ({"train_sqnorm": -np.ones((2, 6))}, r"dataset train_sqnorm holds negative squared norms"),
        ({"query_ids": np.array(["q0", "q0", "q2", "q3"], dtype="S")}, r"dataset query_ids has duplicates"),
        ({"components": np.array(["c0", "c0"], dtype="S")}, r"dataset components has duplicates"),
        ({"query_sqnorm": np.ones((2, 3))}, r"dataset query_sqnorm has shape \(2, 3\), expected \(2, 4\)"),
        ({"dot": np.ones((2, 4, 5))}, r"dot has shape \(2, 4, 5\), expected \(2, 4, 6\)"),
        ({"component_params": np.array([3, 0])}, r"component_params holds non-positive"),
    ],
)
def test_bad_similarity_stores_name_file_and_dataset(tmp_path, change, message):
    path = similarity_file(tmp_path / "sim.h5", **change)
    with pytest.raises(ValueError, match=message):
        load_similarity(path)
    r = subprocess.run([CLI, "evaluate", "--similarity", path], capture_output=True, text=True)
    assert r.returncode == 2 and "sim.h5" in r.stderr and "Traceback" not in r.stderr


def test_candidates_out_of_range_are_refused(tmp_path):
    path = similarity_file(
        tmp_path / "sim.h5", candidates=np.array([[0, 1], [1, 2], [2, 9], [3, 0]]), dot=np.ones((2, 4, 2))
    )
    with pytest.raises(CorruptFileError, match=r"dataset candidates holds indices outside \[0, 6\)"):
        load_similarity(path)


def test_a_changed_value_in_a_sealed_similarity_store_fails_its_checksum(tmp_path):
    from tdabench.integrity import seal_hdf5

    path = similarity_file(tmp_path / "sim.h5")
    seal_hdf5(path)
    load_similarity(path)
    with h5py.File(path, "r+") as f:
        f["dot"][0, 0, 0] += 1.0
    with pytest.raises(CorruptFileError, match=r"sim.h5: dataset dot does not match its checksum"):
        load_similarity(path)


def test_a_changed_projection_file_is_refused(tmp_path):
    with ProjectionWriter(tmp_path / "p.h5", "sjlt", ["t0", "t1"], ["q0"]) as w:
        w.add(2, 0, np.ones((2, 2), np.float32), np.ones((1, 2), np.float32), 0.1)
    assert read_projections(tmp_path / "p.h5", ["q0"])
    with h5py.File(tmp_path / "p.h5", "r+") as f:
        f["k2/seed0/train"][0, 0] = 5.0
    with pytest.raises(CorruptFileError, match=r"p.h5: dataset k2/seed0/train does not match its checksum"):
        read_projections(tmp_path / "p.h5", ["q0"])


def test_non_finite_projection_is_never_renamed_into_place(tmp_path):
    with pytest.raises(CorruptFileError, match=r"non-finite values in dataset\(s\) k2/seed0/queries"):
        with ProjectionWriter(tmp_path / "p.h5", "sjlt", ["t0"], ["q0"]) as w:
            w.add(2, 0, np.ones((1, 2), np.float32), np.full((1, 2), np.inf, np.float32), 0.1)
    assert no_files(tmp_path, "*p.h5*")


def test_kept_blocks_non_finite_or_interrupted_are_never_renamed_into_place(tmp_path):
    """The parts file goes through the same sealed write (tdabench.integrity.sealed_hdf5): a
    non-finite block is refused when sealed, an error inside the block propagates as it is, and
    neither leaves a file (or its temporary) behind."""
    from tdabench.projection_parts import PartsWriter

    def write(block):
        with PartsWriter(tmp_path / "parts.h5", "sjlt", 1, ["a"], [4], [(2, 0)], ["t"], ["q"]) as w:
            w.add(2, 0, 0, 0, block, 0.1)

    with pytest.raises(CorruptFileError, match=r"non-finite values in dataset\(s\) k2/seed0/blocks"):
        write(np.full((2, 2), np.nan, np.float32))
    assert no_files(tmp_path, "*parts.h5*")
    with pytest.raises(TypeError, match="broadcast"):
        write(np.ones((3, 5), np.float32))  # a block of the wrong shape, mid-write
    assert no_files(tmp_path, "*parts.h5*")
    write(np.ones((2, 2), np.float32))
    assert (tmp_path / "parts.h5").exists() and no_files(tmp_path, "*.partial")


# ---------------------------------------------------------------- command line


@pytest.fixture
def sim_path(tmp_path):
    return similarity_file(tmp_path / "sim.h5")


@pytest.mark.parametrize(
    "args,message",
    [
        (["evaluate", "--similarity", "missing.h5"], r"--similarity: no such file missing.h5"),
        (["evaluate", "--similarity", "{sim}", "--k", "0"], r"argument --k: must be at least 1, got 0"),
        (["evaluate", "--similarity", "{sim}", "--k", "x"], r"argument --k: 'x' is not an integer"),
        (["evaluate", "--similarity", "{sim}", "--queries", "@nofile.txt"], r"--queries: no such file nofile.txt"),
        (["evaluate", "--similarity", "{sim}", "--queries", ","], r"--queries ',': no query ids"),
        (["evaluate", "--similarity", "{sim}", "--queries", "q0,q0"], r"--queries: duplicate query ids \['q0'\]"),
        (["evaluate", "--similarity", "{sim}", "--queries", "zz"], r"--queries: unknown query ids \['zz'\]"),
        (["evaluate", "--similarity", "{sim}", "--queries", "1.5"], r"--queries: fraction must be in \(0, 1\]"),
        (["evaluate", "--similarity", "{sim}", "--components", "nonsense"], r"--components:"),
        (["greedy", "--similarity", "{sim}", "--out", "x.parquet", "--selection-fraction", "1.0"], r"in \(0, 1\)"),
        (["config", "--config", "missing.yaml"], r"--config: no such file missing.yaml"),
        (["verify", "no-such-folder"], r"no-such-folder: no such file or folder"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, sim_path, args, message):
    r = subprocess.run(
        [CLI, *[a.replace("{sim}", sim_path) for a in args]], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    import re

    assert re.search(message, r.stderr), r.stderr


def test_a_gradient_shard_passed_as_a_similarity_store_is_named(tmp_path):
    random_store(tmp_path / "g.h5", [f"s{i}" for i in range(4)], [3])
    r = subprocess.run([CLI, "evaluate", "--similarity", str(tmp_path / "g.h5")], capture_output=True, text=True)
    assert r.returncode == 2 and "g.h5: format 'tdabench-gradients/1' is not 'tdabench-similarity/1'" in r.stderr


def test_verify_lists_corrupt_files_with_their_rebuild_command(tmp_path):
    results = tmp_path / "results"
    (results / "gradients" / "train").mkdir(parents=True)
    random_store(results / "gradients" / "train" / "shard-0.h5", [f"s{i}" for i in range(4)], [3])
    pl.DataFrame({"x": [1]}).write_parquet(results / "gradients" / "x.parquet")
    r = subprocess.run([CLI, "verify", str(results)], capture_output=True, text=True)
    assert r.returncode == 0 and "2 files checked" in r.stdout
    with h5py.File(results / "gradients" / "train" / "shard-0.h5", "r+") as f:
        f["grads"][NAME][0, 0] = 7.0
    (results / "gradients" / "x.parquet").write_bytes(b"PAR1 not really")
    r = subprocess.run([CLI, "verify", str(results)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"shard-0.h5: dataset grads/{NAME} does not match its checksum" in r.stdout
    assert "x.parquet: unreadable parquet" in r.stdout
    assert r.stdout.count("snakemake --cores all --force") == 2


# ---------------------------------------------------------------- runtime


def test_training_stops_at_the_first_non_finite_loss_naming_epoch_and_step():
    from tdabench.models import Encoded
    from tdabench.train import TrainConfig, train

    from helpers import tiny_llama

    model = tiny_llama()
    unlabelled = [Encoded([1, 2, 3], [-100, -100, -100], 3, True) for _ in range(4)]  # no loss at all: 0/0
    examples = [Encoded([1, 2, 3], [-100, 2, 3], 3, False) for _ in range(4)]
    cfg = TrainConfig(
        epochs=1,
        batch_size=2,
        learning_rate=1e-3,
        weight_decay=0.0,
        warmup_fraction=0.0,
        label_smoothing=0.0,
        precision="float32",
        seed=0,
    )
    with pytest.raises(ValueError, match=r"4 example\(s\) have no labelled token .*tokenize.max_length"):
        train(model, unlabelled, 0, cfg, progress=False)  # refused before a NaN loss could blame the learning rate
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # diverged weights
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at epoch 1, step 1 .*learning rate"):
        train(model, examples, 0, cfg, progress=False)


@pytest.fixture
def gradients_job(tmp_path, monkeypatch):
    """The gradients stage on a tiny model (monkeypatched loader), for runtime faults."""
    from tdabench.models import TinyModelConfig, build_tiny_model, train_tokenizer
    from tdabench.pipeline import toolkit

    rows = [{"id": f"t{i}", "prompt": f"Where does person {i} live?", "response": f"In town {i}."} for i in range(4)]
    tokenizer = train_tokenizer([r["prompt"] + " " + r["response"] for r in rows], vocab_size=300)
    model = build_tiny_model(TinyModelConfig(320, 16, 24, 2, 2), tokenizer, seed=0)
    monkeypatch.setattr(toolkit, "load_model", lambda path: (model, tokenizer))

    def job(max_length=64, shards=1, shard=0, nan=False, device="cpu"):
        train = pl.DataFrame(rows).with_columns(role=pl.lit("planted"))
        train.write_parquet(tmp_path / "train.parquet")
        train.drop("role").with_columns(source_id=pl.col("id"), setting=pl.lit("p")).write_parquet(
            tmp_path / "queries.parquet"
        )
        if nan:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")
        extraction = {
            "components": ["lm_head"],
            "batch_size": 4,
            "max_component_dim": None,
            "sketch_seed": 0,
            "autocast": None,
        }
        params = {
            "model": "m",
            "shards": shards,
            "extraction": extraction,
            "dtype": "float32",
            "max_cache_gb": 1,
            "verify": 0,
            "verify_tolerance": None,
            "tokenize": {"max_length": max_length, "loss_on": "response"},
            "device": device,
        }
        out = tmp_path / "gradients" / "train" / f"shard-{shard}.h5"
        run_rule(
            JobContext(
                "gradients",
                {"train": str(tmp_path / "train.parquet"), "queries": str(tmp_path / "queries.parquet")},
                {"store": str(out)},
                params,
                {"split": "train", "shard": str(shard)},
            )
        )
        return out

    return job, tmp_path


def test_examples_cut_to_no_labelled_token_are_an_error_listing_ids(gradients_job):
    job, root = gradients_job
    with pytest.raises(
        ValueError, match=r"no labelled token left after truncation to tokenize.max_length=8 .*'t0', 't1'"
    ):
        job(max_length=8)
    assert no_files(root / "gradients" / "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA")
def test_a_gradients_job_asked_for_cuda_on_a_cpu_host_fails_at_its_start(gradients_job):
    from tdabench.device import DeviceError

    job, root = gradients_job
    with pytest.raises(DeviceError, match=r"config key device is 'cuda:1', but CUDA is not available"):
        job(device="cuda:1")
    assert no_files(root / "gradients" / "train")


def test_more_shards_than_examples_is_an_error_not_an_empty_job(gradients_job):
    job, root = gradients_job
    with pytest.raises(ValueError, match=r"train shard 0: no examples .*gradients.shards"):
        job(shards=5, shard=0)
    assert no_files(root / "gradients" / "train")


def test_nan_weights_stop_the_gradients_job_naming_the_samples(gradients_job):
    job, root = gradients_job
    with pytest.raises(NonFiniteGradientError, match=r"non-finite per-sample gradient of component lm_head.weight"):
        job(nan=True)
    assert not (root / "gradients" / "train" / "shard-0.h5").exists()


def test_a_setting_missing_from_the_queries_is_named(tmp_path):
    from tdabench.data.sources import write_queries

    q = pl.DataFrame({"id": ["q"], "source_id": ["t"], "setting": ["paraphrased"], "prompt": ["p"], "response": ["r"]})
    write_queries(q, tmp_path / "queries.parquet")
    random_store(tmp_path / "t.h5", ["t"], [3])
    job = JobContext(
        "similarity",
        {
            "train": [str(tmp_path / "t.h5")],
            "query_grads": [str(tmp_path / "t.h5")],
            "queries": str(tmp_path / "queries.parquet"),
        },
        {"similarity": str(tmp_path / "s.h5")},
        {"block_rows": 4, "dtype": "float64", "layout": "dense"},
        {"setting": "model_generated"},
    )
    with pytest.raises(
        ValueError, match=r"no queries of setting 'model_generated' .*\['paraphrased'\].*dataset.settings"
    ):
        run_rule(job)
    assert not (tmp_path / "s.h5").exists()


def test_a_corrupt_table_input_is_named_with_its_rebuild_command(tmp_path):
    from tdabench.data.sources import read_train
    from tdabench.selection import SelectionTable

    (tmp_path / "train.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"train.parquet: unreadable parquet table .*snakemake --cores all --force"):
        read_train(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"sel.parquet: unreadable parquet table"):
        (tmp_path / "sel.parquet").write_bytes(b"not parquet")
        SelectionTable.read(tmp_path / "sel.parquet")


def test_verify_of_a_folder_without_stores_or_tables_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([CLI, "verify", str(tmp_path / "empty")], capture_output=True, text=True)
    assert r.returncode == 2 and "no stores (.h5) or tables (.parquet) under" in r.stderr


def test_a_table_without_rows_is_refused(tmp_path):
    _, queries = good_pair(tmp_path)
    pl.DataFrame(schema={"id": pl.Utf8, "prompt": pl.Utf8, "response": pl.Utf8}).write_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: no rows"):
        load_files(str(tmp_path / "t.parquet"), queries)


# -- partial files and merges: resume and merge only what matches, never a changed unit --------


def tiny_header(attrs, n_train=6):
    from tdabench.similarity import Header

    return Header(
        components=["a", "b"],
        component_params=[4, 4],
        component_family=["a", "b"],
        component_layer=[0, 0],
        component_dim=[4, 4],
        component_method=["exact", "exact"],
        component_way=["materialised", "materialised"],
        query_ids=["q0", "q1", "q2"],
        train_ids=[f"t{i}" for i in range(n_train)],
        ground_truth=np.array([0, 1, 2]),
        candidates=None,
        attrs=attrs,
    )


def write_units(path, attrs, units, fail_after=None, rows=None):
    """Units u of a tiny store: dot[:, u, :] = u + 1, query_sqnorm 1, train_sqnorm 2 (over `rows`).
    fail_after: raise after this many units (the partial file stays)."""
    from tdabench.similarity import SimilarityWriter

    rows = np.arange(6) if rows is None else np.asarray(rows)
    written = []
    with SimilarityWriter(path, tiny_header(attrs), 3) as w:
        done = w.done
        for u in units:
            if done[u]:
                continue
            if fail_after is not None and len(written) == fail_after:
                raise RuntimeError("killed")
            dot = np.zeros((2, 1, 6))
            dot[:, :, rows] = u + 1
            w.write(
                u,
                slice(u, u + 1),
                dot,
                query_sqnorm=np.ones((2, 1)),
                train_rows=rows,
                train_sqnorm=np.full((2, len(rows)), 2.0),
            )
            written.append(u)
    return written


def test_a_partial_store_resumes_only_under_the_same_settings(tmp_path):
    path = tmp_path / "s.h5"
    attrs = {"setting": "p", "model_fingerprint": "m1", "config_hash": "autocast-none", "numerics": "portable"}
    with pytest.raises(RuntimeError, match="killed"):
        write_units(path, attrs, range(3), fail_after=2)
    for changed in ({"config_hash": "autocast-bf16"}, {"numerics": "native"}, {"model_fingerprint": "m2"}):
        partial = tmp_path / ".s.h5.partial"
        backup = partial.read_bytes()
        assert write_units(path, {**attrs, **changed}, range(3)) == [0, 1, 2]  # started over
        path.unlink()
        partial.write_bytes(backup)
    assert write_units(path, attrs, range(3)) == [2]  # the same settings resume


@pytest.mark.parametrize("damage", ["zeroed", "nan"])
def test_a_damaged_unit_in_a_partial_store_is_computed_again(tmp_path, damage):
    from tdabench.similarity import load_similarity

    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="killed"):
        write_units(path, {"setting": "p"}, range(3), fail_after=2)
    with h5py.File(tmp_path / ".s.h5.partial", "r+") as f:  # unit 1's bytes, after it was marked done
        f["dot"][:, 1, 2] = 0.0 if damage == "zeroed" else np.nan
    assert write_units(path, {"setting": "p"}, range(3)) == [1, 2]
    sim = load_similarity(path)
    assert (sim.dot[:, 1, :] == 2).all() and (sim.dot[:, 0, :] == 1).all()


def test_merge_refuses_parts_of_other_models_configs_or_the_same_shard(tmp_path):
    from tdabench.similarity import load_similarity, merge_similarity

    def part(name, shard, **changes):
        attrs = {"setting": "p", "model_fingerprint": "m1", "config_hash": "c1", "numerics": "portable"}
        attrs |= {"shard": shard, "n_shards": 2, "layout": "dense", "source": "stream", **changes}
        write_units(tmp_path / name, attrs, range(3), rows=[0, 1, 2] if shard == 0 else [3, 4, 5])
        return tmp_path / name

    a, b = part("a.h5", 0), part("b.h5", 1)
    merged = merge_similarity([a, b], tmp_path / "m.h5")
    assert (merged.train_sqnorm == 2).all() and (load_similarity(tmp_path / "m.h5").dot[:, 2, :] == 3).all()
    with pytest.raises(ValueError, match=r"attribute model_fingerprint is 'm2', but .*a.h5's is 'm1'"):
        merge_similarity([a, part("c.h5", 1, model_fingerprint="m2")], tmp_path / "x.h5")
    with pytest.raises(ValueError, match=r"attribute config_hash is 'c2'"):
        merge_similarity([a, part("d.h5", 1, config_hash="c2")], tmp_path / "x.h5")
    with pytest.raises(ValueError, match=r"shards are \[0, 0\].*each of its 2 training shards exactly once"):
        merge_similarity([a, part("e.h5", 0)], tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()
