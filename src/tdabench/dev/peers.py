"""Other ways to get per-sample gradients, for `python -m tdabench.dev.bench gradients --peers`.

Each peer builds, once, a function of a padded batch that returns {parameter name: [batch, numel]}
for the tensors it covers, for the same loss as ours (each sample's mean cross-entropy over its
labelled tokens; tdabench.gradients.per_sample_loss). Each gets its own copy of the model, since
some add hooks to it. Peers whose package is not installed are skipped (the `bench` extra
installs them).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import torch

from tdabench.gradients import no_cache_kwargs, per_sample_loss

PerSample = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def torch_func(model: torch.nn.Module) -> PerSample:
    """functional_call + vmap(grad) over samples: every tensor (tied ones once)."""
    from torch.func import functional_call, grad, vmap

    model = copy.deepcopy(model).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    extra = no_cache_kwargs(model)

    def loss_one(params, ids, mask, labels):  # one sample: [length] each
        out = functional_call(model, params, (), {"input_ids": ids[None], "attention_mask": mask[None], **extra})
        return per_sample_loss(out.logits, labels[None]).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))

    def run(ids, mask, labels):
        grads = per_sample(params, ids, mask, labels)
        return {n: g.reshape(ids.shape[0], -1) for n, g in grads.items()}

    return run


def opacus(model: torch.nn.Module) -> PerSample:
    """Opacus GradSampleModule: its per-layer samplers, functorch for the layers it lacks."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum", strict=False)
    gsm.train()  # Opacus records activations only in training mode (the models here have no dropout)
    extra = no_cache_kwargs(model)

    def run(ids, mask, labels):
        gsm.zero_grad(set_to_none=True)
        for p in gsm.parameters():
            p.grad_sample = None
        logits = gsm(input_ids=ids, attention_mask=mask, **extra).logits
        per_sample_loss(logits, labels).sum().backward()
        return {
            n.removeprefix("_module."): p.grad_sample.reshape(ids.shape[0], -1)
            for n, p in gsm.named_parameters()
            if getattr(p, "grad_sample", None) is not None
        }

    return run


def bergson(model: torch.nn.Module) -> PerSample:
    """Bergson's gradient hooks (its StreamingGradientCollector, no projection, no normalizers):
    nn.Linear weights only. A tied head is left out: Bergson reports only the head's use of the
    shared matrix, not its embedding use (wrong as the tied tensor's gradient)."""
    from bergson.collector.gradient_collectors import StreamingGradientCollector
    from bergson.gradients import GradientProcessor

    model = copy.deepcopy(model).eval()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    root = model.base_model if tied else model
    param_name = {id(p): n for n, p in model.named_parameters()}
    collector = StreamingGradientCollector(
        model=root, processor=GradientProcessor({}, projection_dim=None, include_bias=False), dtype=torch.float32
    )
    names = {m: param_name[id(root.get_submodule(m).weight)] for m in collector.target_info}
    extra = no_cache_kwargs(model)

    def run(ids, mask, labels):
        collector.mod_grads.clear()
        with collector.with_batch(None):  # registers its hooks, removes them on exit
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits
            per_sample_loss(logits, labels).sum().backward()
            model.zero_grad(set_to_none=True)
        return {names[m]: g.float().reshape(ids.shape[0], -1) for m, g in collector.mod_grads.items()}

    return run


PEERS: dict[str, tuple[str | None, Callable[[torch.nn.Module], PerSample]]] = {
    "torch_func": (None, torch_func),
    "opacus": ("opacus", opacus),
    "bergson": ("bergson", bergson),
}


def available() -> dict[str, Callable[[torch.nn.Module], PerSample]]:
    """The peers whose package is installed."""
    return {name: make for name, (pkg, make) in PEERS.items() if pkg is None or importlib.util.find_spec(pkg)}
