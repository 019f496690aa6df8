"""What the model benchmarks run on: a model (the default study's tiny shape, SmolLM2-135M's shape
with random weights, or a local checkpoint) and a seeded, right-padded batch of random token ids
whose second half of each row carries the loss labels, as the study's response-only labels do.
"""

from __future__ import annotations

import torch

MODELS = {
    # SmolLM2-135M's shape (Llama architecture, tied embeddings), randomly initialised.
    "llama-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
}


def tiny_model(seed: int, length: int):
    """The default study's tiny model as its pretrain stage builds it (tokenizer trained on the
    synthetic benchmark's vocabulary), with eager attention as the study loads it (and as vmap over
    padded batches needs); positions for rows of `length` tokens."""
    from tdabench.config import validate_config
    from tdabench.data.synthetic import vocabulary_corpus
    from tdabench.models import TinyModelConfig, build_tiny_model, train_tokenizer

    cfg = validate_config({})
    tiny = TinyModelConfig(**cfg["model"]["tiny"])
    tokenizer = train_tokenizer(vocabulary_corpus(), tiny.vocab_size)
    positions = max(length, 2 * cfg["tokenize"]["max_length"])
    model = build_tiny_model(tiny, tokenizer, seed, max_positions=positions)
    model.set_attn_implementation("eager")
    return model


def build(model_spec: str, samples: int, length: int, seed: int = 0):
    """(model, input_ids, attention_mask, labels) with response-style labels on the second half."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if model_spec == "tiny":
        model = tiny_model(seed, length)
    elif model_spec in MODELS:
        model = LlamaForCausalLM(LlamaConfig(**MODELS[model_spec], attn_implementation="eager"))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_spec, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return (model, *random_batch(model.config.vocab_size, samples, length, seed))


def random_batch(vocab: int, samples: int, length: int, seed: int = 0):
    """(input_ids, attention_mask, labels) [samples, length]: seeded random tokens, right-padded,
    of lengths drawn in [length // 2, length], labels on the second half of each row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (samples,), generator=gen)
    ids = torch.zeros(samples, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, :n] = 1
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
    return ids, mask, labels


def encoded(ids, mask, labels) -> list:
    """Rows of a padded batch as the study's encoded examples (padding dropped)."""
    from tdabench.models import Encoded

    out = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        lab = labels[i, keep].tolist()
        prefix = next((j for j, v in enumerate(lab) if v != -100), len(lab))
        out.append(Encoded(ids[i, keep].tolist(), lab, prefix, False))
    return out
