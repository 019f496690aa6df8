"""Per-sample loss gradients, per component, from one batched forward/backward pass.

For a Linear (or GPT-2 Conv1D) layer y = x W^T + b, the gradient of sample s's loss is
    dL_s/dW = sum_t  g[s, t, :]^T x[s, t, :]        (g = dL/dy, summed over that sample's tokens)
and for an embedding it is g scattered into the rows of the tokens the sample used. Because the
batch loss is the *sum* of per-sample losses and sample s's loss depends only on its own row,
dL/dy[s] = dL_s/dy[s]: one backward pass gives every sample's output gradient at once. Forward
hooks keep each selected layer's input; autograd returns the output gradients; a batched matmul
turns them into per-sample weight gradients. Only the selected weights require grad, so autograd
does no work below the lowest selected layer and never materialises a summed `.grad`.
Parameters of other leaf modules called on one tensor (norm scales and biases) get their
per-sample gradient from the same pass: torch.func maps a vector-Jacobian product of that module
alone over the batch, using the hooked input and output gradient. Anything else falls back to an
exact bs=1 loop.

Large components can be count-sketched on the fly (`sketches`): their per-sample gradient is then
produced in row blocks and added into the sketch, never held whole.

Loss of a sample: mean cross-entropy over its labelled tokens (labels == -100 are ignored), with
the usual causal shift (token t+1 is predicted from position t), as transformers computes it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style layer: W stored as [d_in, d_out]

from tdabench.components import component_registry
from tdabench.projection import CountSketch

# Module types whose per-sample parameter gradients come from hooks, and which parameters.
_HOOKABLE = {nn.Linear: ("weight", "bias"), nn.Embedding: ("weight",), Conv1D: ("weight", "bias")}
BLOCK_ELEMENTS = 1 << 24  # per-sample gradient elements materialised at once for a sketched component


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


def _func_hookable(module: nn.Module) -> bool:
    """Leaf modules other than the above (norms): handled by a per-module vmap(vjp)."""
    return not any(isinstance(module, cls) for cls in _HOOKABLE) and next(module.children(), None) is None


def _func_grads(module: nn.Module, attrs: list[str], x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of `module`'s own parameters: vmap over samples of the VJP of
    module(x[s]) with g[s] -> {attr: [batch, numel]}. Exact for any module that treats samples
    independently (all layers of a causal LM do)."""
    from torch.func import functional_call, vjp, vmap

    params = {a: getattr(module, a).detach().float() for a in attrs}

    def one(xs, gs):  # xs [tokens, d_in], gs [tokens, d_out]
        _, pull = vjp(lambda p: functional_call(module, p, (xs[None],))[0], params)
        return pull(gs)[0]

    grads = vmap(one)(x, g)
    return {a: grads[a].reshape(x.shape[0], -1) for a in attrs}


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Parameter id -> every (module, attribute) holding it (tied weights have several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owners[id(param)].append((module, attr))
    return owners


def _grad_blocks(module: nn.Module, attr: str, x: torch.Tensor, g: torch.Tensor,
                 max_elements: int | None) -> Iterator[tuple[int, torch.Tensor]]:
    """Per-sample gradient of `module.<attr>` in blocks of parameter rows.

    x: the layer's input, g: the gradient of its output. Yields (first row, [batch, rows * cols]),
    rows of the parameter as stored (Linear/Embedding [d_out|vocab, d_in], Conv1D [d_in, d_out]);
    one block when `max_elements` is None.
    """
    batch = g.shape[0]
    param = getattr(module, attr)
    if attr == "bias":
        yield 0, g.reshape(batch, -1, g.shape[-1]).sum(1)  # [batch, d_out]
        return
    n_rows, n_cols = param.shape
    step = n_rows if max_elements is None else max(1, min(n_rows, max_elements // (batch * n_cols)))
    if isinstance(module, nn.Embedding):
        ids = x.expand(batch, *x.shape[1:]).reshape(batch, -1)  # position ids arrive as [1, tokens]
        grads = g.reshape(batch, -1, n_cols)  # [batch, tokens, d]
        sample = torch.arange(batch, device=g.device)[:, None].expand_as(ids)
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            hit = (ids >= r0) & (ids < r1)
            out = torch.zeros(batch * (r1 - r0), n_cols, dtype=g.dtype, device=g.device)
            out.index_add_(0, (sample[hit] * (r1 - r0) + ids[hit] - r0), grads[hit])
            out = out.view(batch, r1 - r0, n_cols)
            if module.padding_idx is not None and r0 <= module.padding_idx < r1:
                out[:, module.padding_idx - r0] = 0  # F.embedding never updates the padding row
            yield r0, out.reshape(batch, -1)
        return
    g = g.reshape(batch, -1, g.shape[-1])  # [batch, tokens, d_out]
    x = x.reshape(batch, -1, x.shape[-1])  # [batch, tokens, d_in]
    rows_of, other = (g, x) if isinstance(module, nn.Linear) else (x, g)  # Conv1D: W is [d_in, d_out]
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        yield r0, torch.bmm(rows_of[:, :, r0:r1].transpose(1, 2), other).reshape(batch, -1)


class _Sink:
    """Collects one component's per-sample gradient: dense [batch, numel], or its count sketch."""

    def __init__(self, batch: int, param: torch.Tensor, sketch: CountSketch | None):
        self.cols = param.shape[1] if param.dim() == 2 else 1
        self.sketch = sketch
        self.shape = (batch, sketch.k if sketch else param.numel())
        self._out: torch.Tensor | None = None

    def add(self, first_row: int, block: torch.Tensor) -> None:
        offset = first_row * self.cols
        if self.sketch is None and self._out is None and block.shape == self.shape:
            self._out = block  # the usual case: one contribution covering the whole tensor, no copy
            return
        if self._out is None:
            self._out = torch.zeros(self.shape)
        if self.sketch is None:
            self._out[:, offset:offset + block.shape[1]] += block
        else:
            self.sketch.add(self._out, offset, block)

    def set(self, value: torch.Tensor) -> None:
        self._out = value

    @property
    def out(self) -> torch.Tensor:
        return torch.zeros(self.shape) if self._out is None else self._out


def per_sample_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    components: Sequence[str] | None = None,
    *,
    sketches: Mapping[str, CountSketch] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of each sample's mean loss over its labelled tokens.

    input_ids, attention_mask, labels: [batch, length] (labels == -100 are ignored).
    components: parameter names (as `model.named_parameters()` gives them); None = all.
    sketches: optional {component: CountSketch}; those components come back as [batch, sketch.k].
    autocast_dtype: e.g. torch.bfloat16 to run the forward pass under autocast (default fp32).
    Returns {component name: [batch, numel] float32}, in the order of `components`.
    """
    params = dict(model.named_parameters())
    names = [c.name for c in component_registry(model)] if components is None else list(components)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"unknown component(s) {missing[:5]}; see tdabench.components.component_registry")
    sketches = dict(sketches or {})
    owners = _owners(model)
    hooked = [n for n in names
              if all(_hookable(m, a) or _func_hookable(m) for m, a in owners[id(params[n])])]
    sinks = {n: _Sink(input_ids.shape[0], params[n], sketches.get(n)) for n in names}

    saved = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()
    def forward_context():  # low precision for the model's forward only; gradient products stay fp32
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(input_ids.device.type, dtype=autocast_dtype)

    try:
        unhandled = []
        if hooked:
            unhandled = _hooked_pass(model, params, owners, hooked, sinks, input_ids, attention_mask, labels,
                                     forward_context)
        fallback = [n for n in names if n not in hooked or n in unhandled]
        if fallback:
            _loop_pass(model, params, fallback, sinks, input_ids, attention_mask, labels, forward_context)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    return {n: sinks[n].out for n in names}


def _only_requires_grad(params: dict[str, nn.Parameter], names: Sequence[str]) -> None:
    for p in params.values():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)


def _hooked_pass(model, params, owners, names, sinks, input_ids, attention_mask, labels,
                 forward_context) -> list[str]:
    """Fill the sinks of `names` from one batched pass; returns names it could not handle."""
    _only_requires_grad(params, names)
    wanted: dict[nn.Module, list[tuple[str, str]]] = defaultdict(list)  # module -> [(attr, name)]
    for n in names:
        for module, attr in owners[id(params[n])]:
            wanted[module].append((attr, n))
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (module, input, output)
    unhandled: set[str] = set()
    batch = input_ids.shape[0]

    def keep(module, inputs, kwargs, output):
        single = len(inputs) == 1 and not kwargs and torch.is_tensor(inputs[0]) and torch.is_tensor(output)
        if not single or (_func_hookable(module) and output.shape[0] != batch):
            unhandled.update(n for _, n in wanted[module])  # called in a way no hook can split by sample
            return None
        if output.shape[0] == 1 and batch > 1:
            # A broadcast output (GPT-2 position embeddings: [1, tokens, d]) would give only the
            # batch-summed gradient; an expanded view gives each sample its own row.
            output = output.expand(batch, *output.shape[1:])
        records.append((module, inputs[0].detach(), output))
        return output

    handles = [m.register_forward_hook(keep, with_kwargs=True) for m in wanted]
    try:
        with torch.enable_grad():
            with forward_context():
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            total = per_sample_loss(logits, labels).sum()
            grads = torch.autograd.grad(total, [y for _, _, y in records], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for (module, x, _), g in zip(records, grads):
        if g is None:  # this call of the layer does not reach the loss
            continue
        g = g.detach().float()
        x = x if x.dtype == torch.long else x.float()
        todo = [(attr, n) for attr, n in wanted[module] if n not in unhandled]
        if _func_hookable(module):
            per_attr = _func_grads(module, [attr for attr, _ in todo], x, g)
            for attr, n in todo:
                sinks[n].add(0, per_attr[attr])
            continue
        for attr, n in todo:
            limit = BLOCK_ELEMENTS if sinks[n].sketch is not None else None
            for first_row, block in _grad_blocks(module, attr, x, g, limit):
                sinks[n].add(first_row, block)
    return sorted(unhandled)


def _loop_pass(model, params, names, sinks, input_ids, attention_mask, labels, forward_context) -> None:
    """Exact fallback for parameters no hook handles: one backward per sample."""
    _only_requires_grad(params, names)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()  # drop padding: a bs=1 pass needs none
        with torch.enable_grad():
            with forward_context():
                logits = model(input_ids=input_ids[b, keep][None], use_cache=False).logits
            loss = per_sample_loss(logits, labels[b, keep][None]).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            one = _Sink(1, params[n], sinks[n].sketch)
            if g is not None:
                one.add(0, g.detach().reshape(1, -1).float())
            rows[n].append(one.out)  # [1, numel or k]
    for n in names:
        sinks[n].set(torch.cat(rows[n]))


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
