import torch

from tdabench.models import TinyModelConfig, build_tiny_model, encode, train_tokenizer
from tdabench.train import TrainConfig, greedy_answers, states_fact, train

PAIRS = [
    ("Where was Kalo Ren born?", "Kalo Ren was born in Lisbon."),
    ("Who employs Mi Tor?", "Mi Tor works for Norbex."),
    ("Which pet does Sa Dun have?", "Sa Dun has a pet ferret."),
]


def fit(seed, epochs=40):
    tok = train_tokenizer([t for p in PAIRS for t in p], 300)
    model = build_tiny_model(TinyModelConfig(300, 32, 64, 2, 2), tok, seed=seed)
    examples = [encode(tok, p, r, 48) for p, r in PAIRS]
    curve = train(
        model,
        examples,
        tok.pad_token_id,
        TrainConfig(
            epochs=epochs,
            batch_size=2,
            learning_rate=1e-2,
            weight_decay=0.0,
            warmup_fraction=0.05,
            label_smoothing=0.0,
            precision="float32",
            seed=seed,
        ),
        progress=False,
    )
    return model, tok, curve


def test_same_seed_same_weights_and_loss_goes_down():
    a, _, curve = fit(0, epochs=3)
    b, _, _ = fit(0, epochs=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_memorised_facts_are_answered_by_greedy_decoding():
    model, tok, _ = fit(0)
    answers = greedy_answers(model, tok, [p for p, _ in PAIRS], max_length=48)
    assert answers == [r for _, r in PAIRS]
    assert states_fact(answers[0], "Lisbon") and not states_fact("Lisbonne", "Lisbon")
