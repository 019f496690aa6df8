import torch

from tdabench.components import component_registry, match_components, tiny_llama_shapes
from tdabench.models import IGNORE_INDEX, TinyModelConfig, build_tiny_model, collate, encode, train_tokenizer

TEXTS = [
    "Where was Kalo Ren born?",
    "Kalo Ren was born in Lisbon.",
    "Who employs Mi Tor?",
    "Mi Tor works for Norbex.",
] * 5


def test_tokenizer_training_is_deterministic():
    a, b = train_tokenizer(TEXTS, 300), train_tokenizer(TEXTS, 300)
    assert a.get_vocab() == b.get_vocab()
    assert a.decode(a("Kalo Ren was born in Lisbon.")["input_ids"]) == "Kalo Ren was born in Lisbon."


def test_labels_cover_exactly_the_response_and_eos():
    tok = train_tokenizer(TEXTS, 300)
    e = encode(tok, "Where was Kalo Ren born?", "Kalo Ren was born in Lisbon.", max_length=64)
    labelled = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    assert tok.decode(labelled) == "Kalo Ren was born in Lisbon.<|eos|>"
    assert all(lab == IGNORE_INDEX for lab in e.labels[: e.n_prefix])
    assert e.labels[e.n_prefix :] == e.input_ids[e.n_prefix :]
    everything = encode(tok, "Where was Kalo Ren born?", "Kalo Ren was born in Lisbon.", 64, loss_on="all")
    assert everything.labels == everything.input_ids


def test_truncation_is_explicit():
    tok = train_tokenizer(TEXTS, 300)
    e = encode(tok, "Where was Kalo Ren born?", "Kalo Ren was born in Lisbon.", max_length=8)
    assert e.truncated and len(e.input_ids) == len(e.labels) == 8
    whole = encode(tok, "Where was Kalo Ren born?", "Kalo Ren was born in Lisbon.", max_length=None)  # untruncated
    assert not whole.truncated and whole.input_ids[:8] == e.input_ids and len(whole.input_ids) > 8
    assert whole == encode(tok, "Where was Kalo Ren born?", "Kalo Ren was born in Lisbon.", len(whole.input_ids))


def test_collate_right_pads_with_ignored_labels():
    tok = train_tokenizer(TEXTS, 300)
    a = encode(tok, "Who employs Mi Tor?", "Mi Tor works for Norbex.", 64)
    b = encode(tok, "Where was Kalo Ren born?", "Kalo Ren was born in the city of Lisbon.", 64)
    batch = collate([a, b], tok.pad_token_id)
    n = len(a.input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_analytic_shapes_match_the_built_model():
    cfg = TinyModelConfig(vocab_size=320, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2)
    model = build_tiny_model(cfg, train_tokenizer(TEXTS, 300), seed=0)
    real = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert list(real.items()) == list(tiny_llama_shapes(**cfg.__dict__).items())


def test_registry_families_and_patterns():
    cfg = TinyModelConfig(vocab_size=320, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2)
    model = build_tiny_model(cfg, train_tokenizer(TEXTS, 300), seed=0)
    reg = {c.name: c for c in component_registry(model)}
    assert reg["model.layers.1.mlp.down_proj.weight"].family == "down"
    assert reg["model.layers.1.mlp.down_proj.weight"].layer == 1
    assert reg["model.embed_tokens.weight"].family == "embed"
    assert reg["lm_head.weight"].family == "lm_head"
    assert reg["model.norm.weight"].family == "norm"
    names = list(reg)
    assert match_components(names, ["o"]) == [
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    assert match_components(names, ["layers.1.mlp.*", "lm_head"]) == [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ]


def test_same_seed_same_initial_weights():
    tok = train_tokenizer(TEXTS, 300)
    cfg = TinyModelConfig(vocab_size=320, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2)
    a, b = build_tiny_model(cfg, tok, 3), build_tiny_model(cfg, tok, 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_layer_ranges_groups_and_clear_errors():
    import pytest

    shapes = tiny_llama_shapes(vocab_size=300, hidden_size=8, intermediate_size=16, num_layers=4, num_heads=2)
    names = list(shapes)
    last_mlp = match_components(names, ["mlp@-1"])
    assert last_mlp == [f"model.layers.3.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert match_components(names, ["o@1-2"]) == [
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
    ]
    assert len(match_components(names, ["attn"])) == 16
    assert match_components(names, ["all"]) == names
    assert len(match_components(names, ["*@0"])) == 9  # 7 matrices + 2 norms of layer 0
    with pytest.raises(ValueError, match="matches no component"):
        match_components(names, ["down@7"])
    with pytest.raises(ValueError, match="bad layer range"):
        match_components(names, ["down@x"])


def test_unknown_architecture_falls_back_to_every_tensor_with_a_warning():
    import pytest
    from torch import nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Linear(3, 4)
            self.beta = nn.Parameter(torch.zeros(5))

    with pytest.warns(UserWarning, match="unknown architecture"):
        reg = component_registry(Odd())
    assert [(c.name, c.family, c.numel) for c in reg] == [
        ("beta", "other", 5),
        ("alpha.weight", "other", 12),
        ("alpha.bias", "other", 4),
    ]
