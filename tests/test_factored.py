"""Dot products of per-sample linear-layer gradients: the factored form against forming the
gradients, and both against the extractor's per-sample gradients (issue 12, item 2)."""

import pytest
import torch

from tdabench.factored import FACTORED, MATERIALISED, choose, cost, pair_dots
from tdabench.gradients import GradientExtractor, per_sample_loss

from helpers import padded_batch, tiny_llama


def test_factored_equals_materialised_and_the_explicit_gradients():
    g = torch.Generator().manual_seed(0)
    pairs, ta, tb, d_in, d_out = 5, 7, 4, 6, 3
    xa, xb = torch.randn(pairs, ta, d_in, generator=g), torch.randn(pairs, tb, d_in, generator=g)
    ga, gb = torch.randn(pairs, ta, d_out, generator=g), torch.randn(pairs, tb, d_out, generator=g)
    ga[:, -2:] = 0  # padded tokens: no output gradient
    a64, b64 = (xa.double(), ga.double()), (xb.double(), gb.double())

    def gradient(x, gy, p):  # one sample's weight gradient: a sum over tokens of outer products
        return sum(torch.outer(gy[p, t], x[p, t]) for t in range(x.shape[1]))

    explicit = [float((gradient(*a64, p) * gradient(*b64, p)).sum()) for p in range(pairs)]
    for how in (FACTORED, MATERIALISED):
        torch.testing.assert_close(pair_dots(xa, ga, xb, gb, how), torch.tensor(explicit, dtype=torch.float64))


def test_dots_match_the_extractors_per_sample_gradients():
    model = tiny_llama()
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["x"], seen["y"] = inputs[0].detach(), output

    handle = layer.register_forward_hook(keep)
    per_sample_loss(model(input_ids=ids, attention_mask=mask).logits, labels).sum().backward()
    handle.remove()
    x, gy = seen["x"], seen["y"].grad  # [4, tokens, d_in], [4, tokens, d_out]: each row its sample's own
    grads = GradientExtractor(model, [f"{name}.weight"])(ids, mask, labels)[f"{name}.weight"].double()
    a, b = torch.tensor([0, 1, 2, 3, 0, 2]), torch.tensor([1, 3, 2, 0, 0, 1])  # incl. squared norms
    want = (grads[a] * grads[b]).sum(1)
    scale = grads[a].norm(dim=1) * grads[b].norm(dim=1)
    for how in (FACTORED, MATERIALISED):
        got = pair_dots(x[a], gy[a], x[b], gy[b], how)
        assert float(((got - want).abs() / scale).max()) < 1e-6, how


def test_choose_takes_the_factored_form_for_few_pairs_and_forms_gradients_for_many():
    # SmolLM2-135M's MLP down projection (1536 -> 576) on 64-token samples
    assert choose(64, 1536, 576, pairs_per_sample=6) == FACTORED  # a query, 5 candidates, its norm
    assert choose(64, 1536, 576, pairs_per_sample=1000) == MATERIALISED  # every training example
    assert choose(512, 1536, 576, pairs_per_sample=6) == MATERIALISED  # long samples
    for args in [(64, 1536, 576, 6), (512, 64, 64, 2), (8, 4096, 4096, 300)]:
        picked, other = (FACTORED, MATERIALISED) if choose(*args) == FACTORED else (MATERIALISED, FACTORED)
        assert cost(picked, *args) <= cost(other, *args)


def test_pairs_that_do_not_line_up_and_unknown_ways_are_clear_errors():
    x, gy = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="pairs do not line up"):
        pair_dots(x, gy, x[:1], gy[:1])
    with pytest.raises(ValueError, match="how must be"):
        pair_dots(x, gy, x, gy, how="fast")
