"""The published setting end to end, on a stand-in: config/studies/lima.yaml through Snakemake with
only the data and model locations overridden (and MLflow off), on LIMA-format datasets written with
`save_to_disk` and a tiny randomly initialised OLMo-architecture model with a Tulu-style chat
template. The protocol is checked from the outputs: b = 5, the paper's BM25 candidates, the
embedding attributed, nothing sketched or truncated, float32 gradients."""

import json
import os

import numpy as np
import polars as pl
import pytest
import yaml

from tdabench.data.synthetic import SyntheticConfig, generate

from helpers import assert_papers_set, papers_candidates
from workflow_helpers import copy_repo, planned, snakemake

pytestmark = pytest.mark.workflow
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] + eos_token }}\n{% endif %}"
    "{% if loop.last and add_generation_prompt %}<|assistant|>\n{% endif %}"
    "{% endfor %}"
)
LONG_RESPONSE = " ".join(["and so the story of the city goes on"] * 12)  # > 64 tokens: the default would cut it


def chat(prompt, response):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def lima_like(root):
    """The three published sets' column layout: `id` (non-contiguous `lima_<n>`) and `messages`;
    `id` and `paraphrased_messages`; `id` and `model_generated_messages` (the model's answers to the
    paraphrased prompts)."""
    import datasets

    train, queries = generate(SyntheticConfig(n_entities=8, background_facts_per_entity=2, planted_facts=10, seed=5))
    ids = {old: f"lima_{7 * i + 3}" for i, old in enumerate(train["id"].to_list())}
    responses = train["response"].to_list()
    responses[0] = responses[0] + " " + LONG_RESPONSE
    datasets.Dataset.from_dict(
        {"id": list(ids.values()), "messages": [chat(p, r) for p, r in zip(train["prompt"].to_list(), responses)]}
    ).save_to_disk(str(root / "LIMA-original"))
    para = queries.filter(pl.col("setting") == "paraphrased")
    sources = [ids[s] for s in para["source_id"].to_list()]
    prompts, answers = para["prompt"].to_list(), para["response"].to_list()
    datasets.Dataset.from_dict(
        {"id": sources, "paraphrased_messages": [chat(p, r) for p, r in zip(prompts, answers)]}
    ).save_to_disk(str(root / "LIMA-paraphrased"))
    generated = [f"I think the answer is {a.split()[-1]}" for a in answers]
    datasets.Dataset.from_dict(
        {"id": sources, "model_generated_messages": [chat(p, g) for p, g in zip(prompts, generated)]}
    ).save_to_disk(str(root / "LIMA-model-generated"))
    return train["prompt"].to_list() + responses + prompts


def tiny_olmo(root, texts):
    """A randomly initialised OLMo (tied embeddings, like AMD-OLMo-1B) with a Tulu-style template."""
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    from tdabench.models import train_tokenizer

    tokenizer = train_tokenizer(texts, 300)
    tokenizer.chat_template = TULU_TEMPLATE
    config = OlmoConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    OlmoForCausalLM(config).save_pretrained(root / "olmo")
    tokenizer.save_pretrained(root / "olmo")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    pytest.importorskip("datasets")
    data = tmp_path_factory.mktemp("lima")
    texts = lima_like(data)
    tiny_olmo(data, texts)
    root = copy_repo(tmp_path_factory.mktemp("published"))
    published = yaml.safe_load((root / "config/studies/lima.yaml").read_text())
    queries = published["dataset"]["huggingface"]["queries"]
    locations = {  # the published profile's data and model, here; nothing else
        "dataset": {
            "huggingface": {
                "train": {**published["dataset"]["huggingface"]["train"], "path": str(data / "LIMA-original")},
                "queries": [
                    {**queries[0], "path": str(data / "LIMA-paraphrased")},
                    {**queries[1], "path": str(data / "LIMA-model-generated")},
                ],
            }
        },
        "model": {"name_or_path": str(data / "olmo")},
        "mlflow": {"enabled": False},
    }
    (root / "here.yaml").write_text(yaml.safe_dump(locations))
    snakemake(root, "--configfile", "config/studies/lima.yaml", "here.yaml")
    return root, data


def test_the_published_profile_runs_on_a_stand_in(stand_in):
    root, _ = stand_in
    metrics = pl.read_parquet(root / "results/evaluation/metrics.parquet")  # the study's own protocol:
    assert set(metrics["protocol"]) == {"candidates"} and set(metrics["b"]) == {5}  # within the 5 candidates
    assert set(metrics["setting"]) == {"paraphrased", "model_generated"}
    assert pl.read_parquet(root / "results/evaluation/candidates.parquet").is_empty()  # nothing beside it
    in_sample = pl.read_parquet(root / "results/evaluation/in_sample.parquet")  # the paper's metric
    full = in_sample.filter(pl.col("method") == "full")
    assert full["setting"].to_list() == ["paraphrased", "model_generated"] and set(full["b"]) == {5}
    assert set(full["n_queries"]) == {10} and set(full["split"]) == {-1}  # every query, in-sample
    assert "In-sample over all queries" in (root / "results/summary.md").read_text()
    assert {"full", "single", "greedy", "bm25"} <= set(metrics["method"])
    assert not (root / "results/models").exists()  # attributed as it is: no pre-training, no fine-tuning


def test_the_manifest_names_the_config_files_and_an_edited_dataset_reruns_the_study(stand_in):
    root, data = stand_in
    manifest = json.loads((root / "results/manifest.json").read_text())
    assert manifest["configfiles"] == ["config/studies/lima.yaml", "here.yaml"]  # rebuild commands name them
    assert manifest["files"]["results/data/train.parquet"]["rule"] == "dataset"
    assert planned(root, "--configfile", "config/studies/lima.yaml", "here.yaml") == {}
    info = data / "LIMA-model-generated" / "dataset_info.json"  # a local dataset folder, edited in place
    kept, stat = info.read_bytes(), info.stat()
    info.write_bytes(kept + b"\n")  # new bytes: Snakemake reruns on content, not on a touched mtime
    try:
        stats = planned(root, "--configfile", "config/studies/lima.yaml", "here.yaml")
    finally:
        info.write_bytes(kept)
        os.utime(info, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stats.get("dataset") == 1 and stats.get("summary") == 1


def test_candidates_are_the_papers_bm25_top5_shared_by_both_settings(stand_in):
    root, _ = stand_in
    table = pl.read_parquet(root / "results/data/bm25_candidates.parquet")
    train = pl.read_parquet(root / "results/data/train.parquet")
    ids, prompts = train["id"].to_list(), train["prompt"].to_list()
    assert ids[0].startswith("lima_") and ids[1] == "lima_10"  # the data's own ids
    queries = pl.read_parquet(root / "results/data/queries_all.parquet")
    checked = 0
    for q in queries.filter(pl.col("setting") == "paraphrased").iter_rows(named=True):
        got = table.filter((pl.col("setting") == "paraphrased") & (pl.col("query_id") == q["id"])).sort("slot")
        assert got.height == 5
        paper = papers_candidates(prompts, q["prompt"], ids.index(q["source_id"]))
        if paper is None:
            continue
        assert_papers_set(got, paper, ids)
        checked += 1
    assert checked >= 3  # the others tie at the 5th place (template words): the paper's set is undefined there
    both = table.pivot(on="setting", index=["source_id", "slot"], values="train_id", aggregate_function="first")
    assert both["paraphrased"].to_list() == both["model_generated"].to_list()


def test_every_component_exact_the_embedding_included_in_float32_untruncated(stand_in):
    import h5py

    from tdabench.similarity import load_similarity

    root, _ = stand_in
    for setting in ("paraphrased", "model_generated"):
        sim = load_similarity(root / f"results/similarity/{setting}.h5")
        assert sim.n_columns == 5  # the candidate layout
        assert set(sim.component_method) == {"exact"}  # nothing sketched
        names = list(sim.components)
        assert "model.embed_tokens.weight" in names and not any("lm_head" in n for n in names)  # tied: once
        assert len(names) == 1 + 7 * 2  # the embedding + q, k, v, o, gate, up, down of 2 layers
    stores = sorted((root / "results/gradients").rglob("*.h5"))  # auto: this tiny model's cache fits
    assert stores
    for path in stores:
        with h5py.File(path) as f:
            assert {f["grads"][n].dtype for n in f["grads"]} == {np.dtype("float32")}
    logs = "".join(p.read_text() for p in (root / "logs").rglob("*.log"))
    assert "truncated" not in logs  # the long example kept whole
