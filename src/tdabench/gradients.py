"""Per-sample loss gradients, per component, from one batched forward/backward pass.

For a Linear (or GPT-2 Conv1D) layer y = x W^T + b, the gradient of sample s's loss is
    dL_s/dW = sum_t  g[s, t, :]^T x[s, t, :]        (g = dL/dy, summed over that sample's tokens)
and for an embedding it is g scattered into the rows of the tokens the sample used. Because the
batch loss is the *sum* of per-sample losses and sample s's loss depends only on its own row,
dL/dy[s] = dL_s/dy[s]: one backward pass gives every sample's output gradient at once. Forward
hooks keep each selected layer's input; autograd returns the output gradients; a batched matmul
turns them into per-sample weight gradients. Only the selected weights require grad, so autograd
does no work below the lowest selected layer and never materialises a summed `.grad`.
Anything else (norm scales, unknown module types) falls back to an exact bs=1 loop.

Loss of a sample: mean cross-entropy over its labelled tokens (labels == -100 are ignored), with
the usual causal shift (token t+1 is predicted from position t), as transformers computes it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tdabench.components import component_registry

from transformers.pytorch_utils import Conv1D  # GPT-2 style layer: W stored as [d_in, d_out]

# Module types whose per-sample parameter gradients come from hooks, and which parameters.
_HOOKABLE = {nn.Linear: ("weight", "bias"), nn.Embedding: ("weight",), Conv1D: ("weight", "bias")}


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each sample over its labelled tokens -> [batch]."""
    batch, length, vocab = logits.shape
    shift_logits = logits[:, :-1].reshape(-1, vocab).float()  # [batch*(length-1), vocab]
    shift_labels = labels[:, 1:].reshape(-1)  # [batch*(length-1)]
    token_loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
    token_loss = token_loss.view(batch, length - 1)
    counted = (labels[:, 1:] != -100).sum(1)  # [batch]
    return token_loss.sum(1) / counted.clamp(min=1)


def _hookable(module: nn.Module, attr: str) -> bool:
    return any(isinstance(module, cls) and attr in attrs for cls, attrs in _HOOKABLE.items())


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Parameter id -> every (module, attribute) holding it (tied weights have several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owners[id(param)].append((module, attr))
    return owners


def _layer_grad(module: nn.Module, attr: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of `module.<attr>` from its input x and output gradient g -> [batch, numel]."""
    batch = g.shape[0]
    if isinstance(module, nn.Embedding):
        vocab, width = module.weight.shape
        x = x.expand(batch, *x.shape[1:])  # position ids arrive as [1, tokens]
        rows = (torch.arange(batch, device=x.device)[:, None] * vocab + x).reshape(-1)  # [batch*tokens]
        out = torch.zeros(batch * vocab, width, dtype=g.dtype, device=g.device)
        out.index_add_(0, rows, g.reshape(-1, width))
        out = out.view(batch, vocab, width)
        if module.padding_idx is not None:  # F.embedding never updates the padding row
            out[:, module.padding_idx] = 0
        return out.reshape(batch, -1)
    g = g.reshape(batch, -1, g.shape[-1])  # [batch, tokens, d_out]
    x = x.reshape(batch, -1, x.shape[-1])  # [batch, tokens, d_in]
    if attr == "bias":
        return g.sum(1)  # [batch, d_out]
    if isinstance(module, nn.Linear):  # weight [d_out, d_in]
        return torch.bmm(g.transpose(1, 2), x).reshape(batch, -1)
    return torch.bmm(x.transpose(1, 2), g).reshape(batch, -1)  # Conv1D weight [d_in, d_out]


def per_sample_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    components: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of each sample's mean loss over its labelled tokens.

    input_ids, attention_mask, labels: [batch, length] (labels == -100 are ignored).
    components: parameter names (as `model.named_parameters()` gives them); None = all.
    Returns {component name: [batch, numel] float32}, in the order of `components`.
    """
    params = dict(model.named_parameters())
    names = [c.name for c in component_registry(model)] if components is None else list(components)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"unknown component(s) {missing[:5]}; see tdabench.components.component_registry")
    owners = _owners(model)
    hooked = [n for n in names if all(_hookable(m, a) for m, a in owners[id(params[n])])]
    fallback = [n for n in names if n not in hooked]

    saved = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        out: dict[str, torch.Tensor] = {}
        if hooked:
            out.update(_hooked_pass(model, params, owners, hooked, input_ids, attention_mask, labels))
        if fallback:
            out.update(_loop_pass(model, params, fallback, input_ids, attention_mask, labels))
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    return {n: out[n] for n in names}


def _only_requires_grad(params: dict[str, nn.Parameter], names: Sequence[str]) -> None:
    for p in params.values():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)


def _hooked_pass(model, params, owners, names, input_ids, attention_mask, labels):
    _only_requires_grad(params, names)
    wanted: dict[nn.Module, list[tuple[str, str]]] = defaultdict(list)  # module -> [(attr, name)]
    for n in names:
        for module, attr in owners[id(params[n])]:
            wanted[module].append((attr, n))
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (module, input, output)
    batch = input_ids.shape[0]

    def keep(module, inputs, output):
        if output.shape[0] == 1 and batch > 1:
            # A broadcast output (GPT-2 position embeddings: [1, tokens, d]) would give only the
            # batch-summed gradient; an expanded view gives each sample its own row.
            output = output.expand(batch, *output.shape[1:])
        records.append((module, inputs[0].detach(), output))
        return output

    handles = [m.register_forward_hook(keep) for m in wanted]
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            total = per_sample_loss(logits, labels).sum()
            outputs = [y for _, _, y in records]
            grads = torch.autograd.grad(total, outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    result = {n: torch.zeros(batch, params[n].numel()) for n in names}
    for (module, x, _), g in zip(records, grads):
        if g is None:  # this call of the layer does not reach the loss
            continue
        for attr, n in wanted[module]:
            result[n] += _layer_grad(module, attr, x, g.detach()).float()
    return result


def _loop_pass(model, params, names, input_ids, attention_mask, labels):
    """Exact fallback for parameters no hook handles: one backward per sample."""
    _only_requires_grad(params, names)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()  # drop padding: a bs=1 pass needs none
        with torch.enable_grad():
            logits = model(input_ids=input_ids[b, keep][None], use_cache=False).logits
            loss = per_sample_loss(logits, labels[b, keep][None]).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            rows[n].append(torch.zeros(params[n].numel()) if g is None else g.detach().reshape(-1).float())
    return {n: torch.stack(r) for n, r in rows.items()}


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
