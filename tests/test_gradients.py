"""Per-sample gradients against the slow obvious reference: a bs=1 loss.backward() loop."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tdabench.components import component_registry
from tdabench.gradcheck import GradientCheckError, check_extractor, relative_errors
from tdabench.gradients import HOOK, LOOP, VMAP, GradientExtractor, per_sample_gradients, per_sample_loss
from tdabench.projection import CountSketch

from helpers import VOCAB, padded_batch, tiny_llama


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def reference(model, ids, mask, labels, names):
    """bs=1 loop on the unpadded sequence: backward, clone every .grad."""
    params = dict(model.named_parameters())
    rows = {n: [] for n in names}
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[b, keep][None]).logits
        per_sample_loss(logits, labels[b, keep][None]).sum().backward()
        for n in names:
            g = params[n].grad
            rows[n].append(torch.zeros(params[n].numel()) if g is None else g.reshape(-1).clone())
    return {n: torch.stack(r) for n, r in rows.items()}


def max_rel_error(got, want):
    worst = 0.0
    for n in want:
        for a, b in zip(got[n], want[n]):
            denom = b.norm()
            err = (a - b).norm() / denom if denom > 0 else a.norm()
            worst = max(worst, float(err))
    return worst


@pytest.mark.parametrize(
    "build", [tiny_llama, lambda: tiny_llama(tie=True), tiny_gpt2], ids=["llama", "llama-tied", "gpt2"]
)
def test_all_components_match_bs1_loop(build):
    model = build()
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    names = [c.name for c in component_registry(model)]
    got = per_sample_gradients(model, ids, mask, labels)
    want = reference(model, ids, mask, labels, names)
    assert list(got) == names
    assert all(got[n].shape == (4, dict(model.named_parameters())[n].numel()) for n in names)
    assert max_rel_error(got, want) < 1e-5


def test_selection_matches_and_leaves_model_untouched():
    model = tiny_llama()
    ids, mask, labels = padded_batch([8, 11, 4], [2, 5, 1])
    names = [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    got = per_sample_gradients(model, ids, mask, labels, components=names)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into .grad
    assert list(got) == names
    assert max_rel_error(got, reference(model, ids, mask, labels, names)) < 1e-5


def test_gradients_are_not_all_zero_and_differ_between_samples():
    model = tiny_llama()
    ids, mask, labels = padded_batch([6, 6], [2, 2])
    got = per_sample_gradients(model, ids, mask, labels, components=["lm_head.weight"])
    g = got["lm_head.weight"]
    assert g.abs().sum() > 0
    assert not torch.allclose(g[0], g[1])


def test_unknown_component_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown component"):
        per_sample_gradients(tiny_llama(), *padded_batch([4], [1]), components=["nope.weight"])


def tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).eval()


def tiny_olmo(version=1):
    from transformers import Olmo2Config, Olmo2ForCausalLM, OlmoConfig, OlmoForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = (OlmoConfig, OlmoForCausalLM) if version == 1 else (Olmo2Config, Olmo2ForCausalLM)
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return model_cls(cfg).eval()


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).eval()


@pytest.mark.parametrize(
    "build", [tiny_neox, tiny_olmo, lambda: tiny_olmo(2), tiny_qwen2], ids=["gpt-neox", "olmo", "olmo2", "qwen2"]
)
def test_more_architectures_match_bs1_loop(build):
    model = build()
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    names = [c.name for c in component_registry(model)]
    got = per_sample_gradients(model, ids, mask, labels)
    assert max_rel_error(got, reference(model, ids, mask, labels, names)) < 1e-5
    last = [n for n in names if ".1." in n and ("mlp" in n or "dense_" in n)]  # a selection: last layer's MLP
    got = per_sample_gradients(model, ids, mask, labels, components=last)
    assert max_rel_error(got, reference(model, ids, mask, labels, last)) < 1e-5


@pytest.mark.parametrize(
    "build",
    [tiny_llama, lambda: tiny_llama(tie=True), tiny_gpt2, tiny_neox],
    ids=["llama", "llama-tied", "gpt2", "neox"],
)
def test_the_head_skips_positions_that_predict_no_label_and_every_gradient_keeps_its_bits(build, monkeypatch):
    """Where the head's parameters are not extracted, its logits are computed only from the first
    position that predicts a label: the gradients are the bs=1 loop's, and bit for bit those of
    a pass with every logit; where they are extracted, every position goes through the head."""
    model = build()
    ids, mask, labels = padded_batch([9, 5, 12, 7], [4, 3, 6, 5])  # positions 0 and 1 predict no label
    head = model.get_output_embeddings()
    heads = {id(p) for p in head.parameters()}
    names = [c.name for c in component_registry(model) if id(dict(model.named_parameters())[c.name]) not in heads]
    seen = []
    hook = head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[1]))
    extractor = GradientExtractor(model, names)
    got = extractor(ids, mask, labels)
    losses = extractor.batch_losses
    assert seen == [ids.shape[1] - 2]
    assert max_rel_error(got, reference(model, ids, mask, labels, names)) < 1e-5
    monkeypatch.setattr(extractor, "_head_trims", False)
    every = extractor(ids, mask, labels)
    assert seen[-1] == ids.shape[1]
    assert all(torch.equal(got[n], every[n]) for n in names) and torch.equal(losses, extractor.batch_losses)
    hook.remove()
    assert GradientExtractor(model, [c.name for c in component_registry(model)])._head_kwargs(labels) == {}


def test_the_loss_of_the_last_positions_is_the_loss_of_every_position():
    torch.manual_seed(0)
    ids, _, labels = padded_batch([9, 5, 12, 7], [4, 3, 6, 5])
    logits = torch.randn(*ids.shape, 11)
    labels = labels % 11 * (labels >= 0) + -100 * (labels < 0)
    assert torch.equal(per_sample_loss(logits[:, 2:], labels), per_sample_loss(logits, labels))


def test_blockwise_and_sketched_components_match_dense(monkeypatch):
    import tdabench.gradients as G
    from tdabench.projection import CountSketch, name_key

    model = tiny_llama(tie=True)  # tied embed/head: two contributions to one sketched tensor
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    dense = per_sample_gradients(model, ids, mask, labels, components=names)
    sketches = {n: CountSketch(dense[n].shape[1], 7, seed=3, key=name_key(n)) for n in names}
    monkeypatch.setattr(G, "BLOCK_ELEMENTS", 4 * 16 * 3)  # force several row blocks per tensor
    sketched = per_sample_gradients(model, ids, mask, labels, components=names, sketches=sketches)
    for n in names:
        assert sketched[n].shape == (4, 7)
        torch.testing.assert_close(sketched[n], sketches[n](dense[n]), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_close_to_fp32():
    model = tiny_llama()
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    names = ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    exact = per_sample_gradients(model, ids, mask, labels, components=names)
    approx = per_sample_gradients(model, ids, mask, labels, components=names, autocast_dtype=torch.bfloat16)
    for n in names:
        assert approx[n].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(approx[n], exact[n], dim=1)
        assert (cos > 0.98).all()


# --- Paths: only provably stock layers are hooked; everything else is exact another way ----------


class ScaledEmbedding(nn.Embedding):
    """Word embedding whose forward multiplies its output (Gemma-style): not the stock forward."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def with_module(model, path, new):
    parent, _, attr = path.rpartition(".")
    old = model.get_submodule(path)
    new.load_state_dict(old.state_dict())
    setattr(model.get_submodule(parent), attr, new)
    return model


def test_scaled_embedding_subclass_is_exact_through_its_own_forward():
    model = tiny_llama(tie=True)  # the head shares the scaled embedding's weight
    model = with_module(model, "model.embed_tokens", ScaledEmbedding(VOCAB, 16, padding_idx=0))
    model.lm_head.weight = model.model.embed_tokens.weight
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    extract = GradientExtractor(model)
    got = extract(ids, mask, labels)
    assert extract.paths["model.embed_tokens.weight"].path == VMAP  # hooking it as stock would be 3x off
    assert extract.paths["model.layers.0.mlp.up_proj.weight"].path == HOOK
    assert max_rel_error(got, reference(model, ids, mask, labels, extract.names)) < 1e-5


class TinyLM(nn.Module):
    """A causal-LM-shaped toy with one use of the embedding that hooks cannot see: logits from the
    embedding matrix outside any layer's forward ("stray"), or its output scaled in place, as CTRL
    does ("in-place")."""

    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.mode, self.embed, self.mix, self.head = mode, nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, VOCAB)
        if mode == "stray-subclass":  # a parameter class of its own (as quantised or sharded ones have)
            self.embed.weight = TaggedParameter(self.embed.weight.detach().clone())
        self.kept = [self.embed.weight]  # a reference outside the module tree (not a registered parameter)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        if self.mode == "in-place":
            h *= 2.0
        if self.mode == "raise":
            raise RuntimeError("a forward that fails half-way")
        h = torch.tanh(self.mix(h)).cumsum(1)  # causal: position t sees tokens <= t
        if self.mode in ("stray", "stray-subclass"):
            return SimpleNamespace(logits=h @ self.embed.weight.T)
        if self.mode == "stray-kept":
            return SimpleNamespace(logits=F.linear(h, self.kept[0]))
        return SimpleNamespace(logits=self.head(h))


class TaggedParameter(nn.Parameter):
    pass


@pytest.mark.filterwarnings("ignore:unknown architecture")
@pytest.mark.parametrize(
    "mode, reason",
    [
        ("stray", "outside its module's forward"),
        ("stray-kept", "outside its module's forward"),  # used through a reference kept elsewhere
        ("stray-subclass", "outside its module's forward"),  # watched by a mode, not by its class
        ("in-place", "output is modified in place"),
    ],
)
def test_parameter_uses_hooks_cannot_see_fall_back_to_the_loop(mode, reason):
    model = TinyLM(mode)
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    classes = {n: type(p) for n, p in model.named_parameters()}
    extract = GradientExtractor(model)
    got = extract(ids, mask, labels)
    assert extract.plan["embed.weight"].path == HOOK
    assert extract.paths["embed.weight"].path == LOOP and reason in extract.paths["embed.weight"].reason
    assert extract.paths["mix.weight"].path == HOOK  # it reads the scaled value: hooking it is exact
    assert max_rel_error(got, reference(model, ids, mask, labels, extract.names)) < 1e-5
    assert {n: type(p) for n, p in model.named_parameters()} == classes  # watching left no trace


@pytest.mark.filterwarnings("ignore:unknown architecture")
def test_parameters_are_plain_again_after_a_forward_that_raises():
    model = TinyLM("raise")
    with pytest.raises(RuntimeError, match="half-way"):
        GradientExtractor(model)(*padded_batch([9, 5], [3, 2]))
    assert all(type(p) is nn.Parameter for p in model.parameters())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_output_buffers_get_exactly_the_fresh_result(tie):
    """Gradients written into caller buffers (reused batch after batch, as the gradients stage
    does) are bitwise those of a call without them: dense, sketched and tied (two contributions)."""
    model = tiny_llama(tie=tie)
    names = [c.name for c in component_registry(model)]
    sketches = {"model.layers.1.mlp.down_proj.weight": CountSketch(16 * 24, 40, seed=3, key=1)}
    extract = GradientExtractor(model, sketches=sketches)
    dims = {n: sketches[n].k if n in sketches else dict(model.named_parameters())[n].numel() for n in names}
    buffers = {n: torch.full((4, d), float("nan")) for n, d in dims.items()}  # unwritten elements would show
    for lengths, prompts in (([9, 5, 12, 7], [3, 2, 6, 1]), ([6, 11], [2, 4])):
        batch = padded_batch(lengths, prompts)
        want = extract(*batch)
        out = {n: b[: len(lengths)] for n, b in buffers.items()}
        got = extract(*batch, out=out)
        for n in names:
            assert got[n].data_ptr() == out[n].data_ptr()  # written in place, not into new memory
            assert torch.equal(got[n], want[n]), n
    with pytest.raises(ValueError, match=r"expected a contiguous float32 \(2, 384\)"):
        extract(*padded_batch([6, 11], [2, 4]), out={"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 383)})


def test_self_check_passes_on_a_stock_model_and_returns_the_batch():
    model = tiny_llama()
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    extract = GradientExtractor(model)
    grads, report = check_extractor(extract, ids, mask, labels, samples=2)
    assert report.samples == [1, 2]  # the shortest and the longest sample
    assert 0 <= report.worst < 1e-5 and set(report.errors) == set(extract.names)
    torch.testing.assert_close(grads["lm_head.weight"], extract(ids, mask, labels)["lm_head.weight"])


def test_a_wrongly_verified_class_is_caught_by_the_self_check(monkeypatch):
    import tdabench.gradients as G

    model = with_module(tiny_llama(), "model.layers.1.mlp.down_proj", ScaledLinear(24, 16, bias=False))
    monkeypatch.setitem(G.VERIFIED, ScaledLinear, nn.Linear)  # someone claims it is a stock Linear
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    with pytest.raises(GradientCheckError, match=r"model\.layers\.1\.mlp\.down_proj\.weight\s+hook") as err:
        check_extractor(GradientExtractor(model), ids, mask, labels)
    assert "model.layers.0" not in str(err.value)  # only the broken component is listed
    monkeypatch.delitem(G.VERIFIED, ScaledLinear)  # unlisted again: exact via its own forward
    check_extractor(GradientExtractor(model), ids, mask, labels)


def test_relative_error_floors_analytically_zero_components():
    ref = {"big": torch.tensor([[3.0, 4.0]]), "zero": torch.tensor([[0.0, 0.0]])}
    noise = {"big": ref["big"], "zero": torch.tensor([[1e-9, 0.0]])}
    assert relative_errors(noise, ref)["zero"] < 1e-6  # rounding noise on a zero gradient passes
    wrong = {"big": ref["big"] * 1.01, "zero": torch.tensor([[0.1, 0.0]])}
    errors = relative_errors(wrong, ref)
    assert errors["big"] == pytest.approx(0.01) and errors["zero"] == pytest.approx(0.1 / 0.05)


def test_self_check_refuses_non_finite_gradients_and_a_nan_tolerance():
    model = tiny_llama()
    ids, mask, labels = padded_batch([9, 5, 12, 7], [3, 2, 6, 1])
    with pytest.raises(ValueError, match="gradients.verify_tolerance"):
        check_extractor(GradientExtractor(model), ids, mask, labels, tolerance=float("nan"))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # a diverged model
    with pytest.raises(GradientCheckError, match="non-finite"):
        check_extractor(GradientExtractor(model), ids, mask, labels)
