"""The gradients stage's self-check, run in-process on a small model: a deliberately broken
component stops the job before any store file exists; a sound model writes the measured error."""

import h5py
import polars as pl
import pytest
import torch
from torch import nn

import tdabench.gradients as G
from tdabench.gradcheck import GradientCheckError
from tdabench.models import TinyModelConfig, build_tiny_model, train_tokenizer
from tdabench.pipeline import gradients as stage
from tdabench.pipeline import toolkit
from tdabench.pipeline.common import JobContext
from tdabench.tracking import Run

BROKEN = "model.layers.1.mlp.down_proj.weight"


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class Recorder(Run):
    """Keeps what the stage logs to MLflow."""

    def __init__(self):
        super().__init__()
        self.metrics, self.dicts = {}, {}

    def log_metrics(self, metrics, step=0):
        self.metrics.update(metrics)

    def log_dict(self, obj, name):
        self.dicts[name] = obj


@pytest.fixture
def job(tmp_path, monkeypatch):
    rows = [
        {"id": f"t{i}", "prompt": f"Where does person {i} live?", "response": f"In town {i % 7}."} for i in range(10)
    ]
    pl.DataFrame(rows).with_columns(role=pl.lit("planted")).write_parquet(tmp_path / "train.parquet")
    queries = pl.DataFrame(rows).with_columns(source_id=pl.col("id"), setting=pl.lit("paraphrased"))
    queries.write_parquet(tmp_path / "queries.parquet")
    tokenizer = train_tokenizer([r["prompt"] + " " + r["response"] for r in rows], vocab_size=300)
    model = build_tiny_model(
        TinyModelConfig(vocab_size=320, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2),
        tokenizer,
        seed=0,
    )
    old = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    model.model.layers[1].mlp.down_proj.load_state_dict(old.state_dict())
    monkeypatch.setattr(toolkit, "load_model", lambda path: (model, tokenizer))
    params = {
        "model": "in-memory-test-model",
        "shards": 1,
        "extraction": {
            "components": ["all"],
            "batch_size": 4,
            "max_component_dim": None,
            "sketch_seed": 0,
            "autocast": None,
        },
        "dtype": "float32",
        "max_cache_gb": 1,
        "verify": 2,
        "verify_tolerance": None,
        "tokenize": {"max_length": 64, "loss_on": "response"},
        "device": "cpu",
    }
    return JobContext(
        "gradients",
        input={s: str(tmp_path / f"{s}.parquet") for s in ("train", "queries")},
        output={"store": str(tmp_path / "gradients" / "train" / "shard-0.h5")},
        params=params,
        wildcards={"split": "train", "shard": "0"},
    )


def test_broken_component_fails_the_job_at_the_self_check_before_any_store(job, monkeypatch, tmp_path):
    monkeypatch.setitem(G.VERIFIED, ScaledLinear, nn.Linear)  # wrongly claimed to be a stock Linear
    with pytest.raises(GradientCheckError, match=BROKEN.replace(".", r"\.")) as err:
        stage.main(job, Recorder())
    assert "model.layers.0." not in str(err.value)
    written = [p.name for p in tmp_path.rglob("*.h5*")]
    assert written == [], f"the failed job left {written}"


def test_sound_model_records_the_self_check_in_store_and_run(job):
    run = Recorder()
    stage.main(job, run)
    with h5py.File(job.output["store"]) as f:
        assert 0 <= f.attrs["verify_max_error"] < 1e-4
        assert f.attrs["verify_samples"] == 2
        assert f["done"][:].all()
        assert torch.from_numpy(f["grads"][BROKEN][:]).abs().sum() > 0
    assert run.metrics["verify_max_error"] == pytest.approx(f_attr(job))
    assert run.metrics["n_path_vmap"] >= 1  # the unlisted subclass: its own forward under vmap
    assert run.dicts["gradient_paths.json"][BROKEN]["path"] == "vmap"


def f_attr(job):
    with h5py.File(job.output["store"]) as f:
        return float(f.attrs["verify_max_error"])
