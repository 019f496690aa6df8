"""Per-sample loss gradients, per component, from one batched forward/backward pass — exact, or
computed the slow exact way, never silently wrong.

Each component (one parameter tensor) takes one of three paths:

* **hook** — the parameter belongs only to modules whose class runs the *stock* forward of
  `nn.Linear`, `nn.Embedding` or GPT-2's `Conv1D` (`type(m).forward is nn.Linear.forward`, …) or a
  class registered with `register_verified`. For y = x W^T + b the gradient of sample s's loss is
      dL_s/dW = sum_t  g[s, t, :]^T x[s, t, :]        (g = dL/dy, summed over that sample's tokens)
  and for an embedding it is g scattered into the rows of the tokens the sample used. The batch loss
  is the *sum* of per-sample losses and sample s's loss depends only on its own row, so
  dL/dy[s] = dL_s/dy[s]: one backward pass gives every sample's output gradient at once. Forward
  hooks keep each layer's input; a batched matmul turns input and output gradient into per-sample
  weight gradients.
* **vmap** — the parameter belongs to other leaf modules (norms; subclasses of the stock layers
  whose forward is their own: scaled word embeddings, offset position embeddings, ...). torch.func
  maps *that module's own forward* over the samples, on the hooked input, each sample with its own
  copy of the parameters; one backward pass fed with the hooked output gradient then gives every
  sample's gradient (all such modules of a batch in one vmap call). Before it is trusted, the
  mapped forward must reproduce the output the module produced in the batch (the "primal check").
* **loop** — anything else: one backward pass per sample (exact, slow).

A planned hook/vmap component falls back to the loop at run time when the pass shows that hooks
cannot split it by sample: the parameter is used outside its module's forward (it is watched by
class during the pass: every torch call that takes it is seen), the module is called in a way
that is not one row per sample, the vmapped forward fails or does not reproduce the batch output.
`GradientExtractor.paths` says which component took which path and why; `tdabench.gradcheck`
compares the result with a bs=1 loop.

Only the selected parameters require grad, so autograd does no work below the lowest selected
layer and never materialises a summed `.grad`. Where the head's parameters are not selected, the
head runs only from the first position that predicts a label (`logits_to_keep`): the positions
before feed no loss, so every gradient keeps its bits. Large components can be count-sketched on the fly
(`sketches`): their per-sample gradient is produced in blocks and added into the sketch.

Loss of a sample: mean cross-entropy over its labelled tokens (labels == -100 are ignored), with
the usual causal shift (token t+1 is predicted from position t), as transformers computes it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D  # GPT-2 style layer: W stored as [d_in, d_out]

from tdabench.components import component_registry
from tdabench.projection import CountSketch
from tdabench.representation import Factors

HOOK, VMAP, LOOP = "hook", "vmap", "loop"
# Stock layers whose per-sample gradients the hook formulas compute, and which of their parameters.
STOCK_LAYERS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("weight", "bias"),
    nn.Embedding: ("weight",),
    Conv1D: ("weight", "bias"),
}
# Classes with a forward of their own that is known to compute exactly what a stock layer computes:
# {class: stock layer}. Empty by default; `register_verified` adds to it (and a wrong entry is what
# the self-check of every gradients job catches).
VERIFIED: dict[type, type] = {}
BLOCK_ELEMENTS = 1 << 24  # per-sample gradient elements materialised at once for a sketched component
# vmap path: the replayed forward must match the batch output to this (max abs diff / max abs).
PRIMAL_RTOL, PRIMAL_RTOL_AUTOCAST = 1e-4, 5e-2  # fp32 batch; bf16/fp16 batch (the replay runs in fp32)


class Replay(NamedTuple):
    """A module call whose per-sample gradients the vmap path computes by replaying its forward."""

    module: nn.Module
    todo: list[tuple[str, str]]  # (parameter attribute, component name)
    inputs: tuple[torch.Tensor, ...]  # as the module saw them in the batch
    output: torch.Tensor  # the batch output, [batch, ...]
    out_grad: torch.Tensor  # dL/d(output), [batch, ...]


def register_verified(cls: type, like: type) -> None:
    """Declare that `cls.forward` computes exactly what the stock layer `like` computes, so its
    parameters take the hook path. Only for classes you have checked (`tdabench.gradcheck`)."""
    if like not in STOCK_LAYERS:
        raise ValueError(f"like must be one of {[c.__name__ for c in STOCK_LAYERS]}, not {like!r}")
    VERIFIED[cls] = like


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each sample over its labelled tokens -> [batch].

    logits: [batch, kept, vocab], the last `kept` positions of labels' [batch, length] (a model
    called with `logits_to_keep`); the positions left out must predict no label."""
    batch, kept, vocab = logits.shape
    first = labels.shape[1] - kept  # positions without logits
    shift_logits = logits[:, :-1].reshape(-1, vocab).float()  # [batch*(kept-1), vocab]
    shift_labels = labels[:, first + 1 :].reshape(-1)  # [batch*(kept-1)]
    token_loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
    # [batch, length-1]: the left-out positions' losses are the zeros they would be, so each sample's
    # sum adds the same terms in the same order as over every position
    token_loss = F.pad(token_loss.view(batch, kept - 1), (first, 0))
    counted = (labels[:, 1:] != -100).sum(1)  # [batch]
    return token_loss.sum(1) / counted.clamp(min=1)


def first_predicting(labels: torch.Tensor) -> int:
    """The first position whose logits a loss reads (position t predicts the label at t+1), for
    a batch's labels [batch, length]; 0 where none is labelled."""
    read = (labels[:, 1:] != -100).any(0).nonzero()  # [positions read, 1]
    return int(read[0, 0]) if len(read) else 0


def forward_takes(model: nn.Module, name: str, through_kwargs: bool = False) -> bool:
    """Whether the model's forward takes keyword `name`: by name, or (through_kwargs) also
    through a **kwargs catch-all, which some models pass on to their inner model unread."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return name in params or (through_kwargs and any(p.kind is p.VAR_KEYWORD for p in params.values()))


def stock_layer(module: nn.Module) -> type | None:
    """The stock layer whose hook formula is exact for `module`, or None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None  # someone else's hook may change what goes in or comes out
    cls = type(module)
    like = VERIFIED.get(cls) or next(
        (base for base in STOCK_LAYERS if isinstance(module, base) and cls.forward is base.forward), None
    )
    if like is nn.Embedding and (module.max_norm is not None or module.scale_grad_by_freq):
        return None  # renormalised rows / frequency-scaled gradients: not the plain scatter
    return like


def module_path(module: nn.Module, attr: str) -> tuple[str, str]:
    """(path, reason) planned for parameter `attr` of `module`, before any pass."""
    like = stock_layer(module)
    if like is not None and attr in STOCK_LAYERS[like]:
        return HOOK, f"stock {like.__name__}"
    if next(module.children(), None) is not None:
        return LOOP, f"{type(module).__name__} has submodules"
    if module._forward_hooks or module._forward_pre_hooks:
        return LOOP, f"{type(module).__name__} has forward hooks of its own"
    return VMAP, f"{type(module).__name__}: own forward"


@dataclass
class ComponentPath:
    path: str  # hook | vmap | loop
    reason: str


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Parameter id -> every (module, attribute) holding it (tied weights have several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owners[id(param)].append((module, attr))
    return owners


def _stock_grad(
    module: nn.Module, like: type, attr: str, x: torch.Tensor, g: torch.Tensor, r0: int, r1: int, out: torch.Tensor
) -> torch.Tensor:
    """Rows [r0, r1) of the per-sample gradient of `module.<attr>` (a stock layer `like`), written
    into `out` [batch, (r1 - r0) * cols] (rows of the parameter as stored: Linear/Embedding
    [d_out|vocab, d_in], Conv1D [d_in, d_out]; a bias is one row of d_out) and returned.

    x: the layer's input [batch, ..., d_in] (ids for an embedding), g: the gradient of its output
    [batch, ..., d_out]. Writing into a caller's buffer (no fresh allocation per batch) spares the
    page faults of first touching new memory (on the default model: 7.6 -> 4.6-5.6 ms per batch).
    """
    batch = g.shape[0]
    if attr == "bias":
        return torch.sum(g.reshape(batch, -1, g.shape[-1]), 1, out=out)  # [batch, d_out]
    n_cols = getattr(module, attr).shape[1]
    if like is nn.Embedding:
        ids = x.reshape(batch, -1)  # [batch, tokens]
        grads = g.reshape(batch, -1, n_cols)  # [batch, tokens, d]
        sample = torch.arange(batch, device=g.device)[:, None].expand_as(ids)
        hit = (ids >= r0) & (ids < r1)
        rows = out.zero_().view(batch * (r1 - r0), n_cols)
        rows.index_add_(0, (sample[hit] * (r1 - r0) + ids[hit] - r0), grads[hit])
        if module.padding_idx is not None and r0 <= module.padding_idx < r1:
            out.view(batch, r1 - r0, n_cols)[:, module.padding_idx - r0] = 0  # F.embedding never updates it
        return out
    g = g.reshape(batch, -1, g.shape[-1])  # [batch, tokens, d_out]
    x = x.reshape(batch, -1, x.shape[-1])  # [batch, tokens, d_in]
    rows_of, other = (g, x) if like is nn.Linear else (x, g)  # Conv1D: W is [d_in, d_out]
    torch.bmm(rows_of[:, :, r0:r1].transpose(1, 2), other, out=out.view(batch, r1 - r0, n_cols))
    return out


def _factors(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Factors:
    """One layer's calls in a pass -> their inputs and output gradients joined along tokens."""
    if len(parts) == 1:
        return Factors(*parts[0])
    return Factors(torch.cat([x for x, _ in parts], 1), torch.cat([g for _, g in parts], 1))


def _row_blocks(n_rows: int, step: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, n_rows, step):
        yield r0, min(r0 + step, n_rows)


class _Sink:
    """Collects one component's per-sample gradient: dense [batch, numel], or its count sketch
    [batch, k]; in `dest` when the caller gives one (else a new tensor)."""

    def __init__(self, batch: int, param: torch.Tensor, sketch: CountSketch | None, dest: torch.Tensor | None = None):
        self.cols = param.shape[1] if param.dim() == 2 else 1
        self.sketch = sketch
        self.shape = (batch, sketch.k if sketch else param.numel())
        self.device = param.device
        if dest is not None and (
            tuple(dest.shape) != self.shape
            or dest.dtype != torch.float32
            or dest.device != self.device
            or not dest.is_contiguous()
        ):
            raise ValueError(
                f"output buffer {tuple(dest.shape)} {dest.dtype} on {dest.device} for a component of "
                f"{tuple(param.shape)}: expected a contiguous float32 {self.shape} on {self.device}"
            )
        self.dest = dest
        self.filled = False  # dest holds a contribution already (later ones are added)
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # kept instead of formed

    def whole(self) -> torch.Tensor | None:
        """The dense output, to write the first full contribution straight into; None when one is
        in already (then `add`) or the component is sketched."""
        if self.filled or self.sketch is not None:
            return None
        if self.dest is None:
            self.dest = torch.empty(self.shape, device=self.device)
        self.filled = True
        return self.dest

    def add(self, first_row: int, block: torch.Tensor, samples: slice = slice(None), scratch: bool = False) -> None:
        """Add `block` [samples, n] to parameter elements [first_row * cols, ... + n) (`scratch`:
        the block may be overwritten)."""
        out, offset = self.out, first_row * self.cols
        if self.sketch is None:
            out[samples, offset : offset + block.shape[1]] += block
        else:  # a slice of rows is a view: adds in place
            self.sketch.add(out[samples], offset, block, overwrite=scratch)

    def set(self, value: torch.Tensor) -> None:
        self.dest = value if self.dest is None else self.dest.copy_(value)
        self.filled = True

    @property
    def out(self) -> torch.Tensor:
        if not self.filled:
            self.dest = torch.zeros(self.shape, device=self.device) if self.dest is None else self.dest.zero_()
            self.filled = True
        return self.dest


class _ParamUse:
    """Notes selected parameters that enter a differentiable computation anywhere but inside the
    forward of a module that owns them (such a use is not in the hooked output gradients)."""

    def __init__(self, params: dict[str, nn.Parameter], owner_ids: dict[str, set[int]]):
        self.params, self.owner_ids = params, owner_ids
        self.names = {id(p): n for n, p in params.items()}
        self.running: list[nn.Module] = []  # owner modules whose forward is executing (innermost last)
        self.stray: set[str] = set()

    def note(self, args, kwargs, out) -> None:
        """One torch call: `args`/`kwargs` went in, `out` came out."""
        for a in _tensors((args, kwargs)):
            name = self.names.get(id(a))
            if name is not None:
                inside = id(self.running[-1]) if self.running else None
                if inside not in self.owner_ids[name] and _requires_grad(out):
                    self.stray.add(name)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Every torch call that takes a selected parameter comes to `note` while this is open.

        Plain nn.Parameters are switched to a subclass whose __torch_function__ notes the call, so
        only calls on them pay (a TorchFunctionMode, which sees every op of the forward, costs 10-20%
        of a small model's pass). The object stays the same, so a reference kept anywhere is
        watched too. Parameters of other classes (quantised, distributed, ...) keep their class,
        and a mode watches every call instead."""
        if not all(type(p) is nn.Parameter for p in self.params.values()):
            with _ParamUseMode(self):
                yield
            return
        _WatchedParameter.use = self
        try:
            for p in self.params.values():
                p.__class__ = _WatchedParameter
            yield
        finally:
            for p in self.params.values():
                p.__class__ = nn.Parameter
            _WatchedParameter.use = None


class _WatchedParameter(nn.Parameter):
    """What a selected nn.Parameter is during the batched forward (see _ParamUse.watching)."""

    use: _ParamUse | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():  # plain tensors out, as an nn.Parameter gives
            out = func(*args, **kwargs)
        if cls.use is not None:
            cls.use.note(args, kwargs, out)
        return out


class _ParamUseMode(TorchFunctionMode):
    """Sees every torch call of the forward (for parameters that cannot be watched by class)."""

    def __init__(self, use: _ParamUse):
        super().__init__()
        self.use = use

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.use.note(args, kwargs, out)
        return out


def no_cache_kwargs(model: nn.Module) -> dict:
    """use_cache=False where the model's forward takes it (no KV cache is needed for one pass)."""
    return {"use_cache": False} if forward_takes(model, "use_cache", through_kwargs=True) else {}


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in `obj` and the lists, tuples and dicts it nests (all a torch call takes).
    A lean stand-in for torch's tree_leaves, which costs more than the tiny model's own ops."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _requires_grad(out) -> bool:
    return any(o.requires_grad for o in _tensors(out))


class GradientExtractor:
    """Per-sample gradients of a fixed set of components of `model` (see the module docstring).

    components: parameter names (as `model.named_parameters()` gives them); None = every component.
    sketches: optional {component: CountSketch}; those components come back as [batch, sketch.k].
    autocast_dtype: e.g. torch.bfloat16 to run the model's forward under autocast (default fp32);
    gradient products stay fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        components: Sequence[str] | None = None,
        *,
        sketches: Mapping[str, CountSketch] | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.params = dict(model.named_parameters())
        self.names = [c.name for c in component_registry(model)] if components is None else list(components)
        missing = [n for n in self.names if n not in self.params]
        if missing:
            raise KeyError(f"unknown component(s) {missing[:5]}; see tdabench.components.component_registry")
        self.sketches = dict(sketches or {})
        self.autocast_dtype = autocast_dtype
        self.owners = _owners(model)
        self._forward_kwargs = no_cache_kwargs(model)  # inspected once, not on every forward
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        extracted = {id(self.params[n]) for n in self.names}
        self._head_trims = (
            head is not None
            # by name only: through a **kwargs catch-all it may reach a call that rejects it
            and forward_takes(model, "logits_to_keep")
            and not any(id(p) in extracted for p in head.parameters())
        )
        self.plan = {n: self._plan(n) for n in self.names}
        self.paths = dict(self.plan)  # as run: the plan, plus every fall-back to the loop seen so far
        self.batch_losses: torch.Tensor | None = None  # [batch] per-sample losses of the last batched pass
        self._scratch: torch.Tensor | None = None  # row blocks of sketched components, reused

    def _plan(self, name: str) -> ComponentPath:
        planned = [module_path(m, a) for m, a in self.owners[id(self.params[name])]]
        for wanted in (LOOP, VMAP, HOOK):  # the slowest path any owner needs
            reasons = sorted({r for p, r in planned if p == wanted})
            if reasons:
                return ComponentPath(wanted, "; ".join(reasons))
        raise AssertionError(name)

    def factorable(self, name: str) -> bool:
        """Whether `name` can come back as `Factors`: an unsketched weight held only by stock
        Linear/Conv1D layers (planned for the hook path)."""
        owners = self.owners[id(self.params[name])]
        return (
            self.plan[name].path == HOOK
            and name not in self.sketches
            and all(attr == "weight" and stock_layer(m) in (nn.Linear, Conv1D) for m, attr in owners)
        )

    def form(self, name: str, factors: Factors, out: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample gradient [n, numel] of a component that came back as `Factors`, formed by
        the product the hook path forms it with (`_stock_grad`), so it is the gradient `__call__`
        would have returned formed (calls of a shared layer: summed over their tokens at once);
        into `out` (contiguous [n, numel] float32) when given."""
        module, attr = self.owners[id(self.params[name])][0]
        param = self.params[name]
        if out is None:
            out = torch.empty(factors.x.shape[0], param.numel(), device=factors.x.device)
        return _stock_grad(module, stock_layer(module), attr, factors.x, factors.g, 0, param.shape[0], out)

    def path_counts(self) -> dict[str, int]:
        counts = {HOOK: 0, VMAP: 0, LOOP: 0}
        for p in self.paths.values():
            counts[p.path] += 1
        return counts

    def describe_paths(self) -> str:
        """One line per path: how many components, and for vmap/loop which ones and why."""
        lines = ["per-sample gradient paths: " + ", ".join(f"{k} {v}" for k, v in self.path_counts().items())]
        for path in (VMAP, LOOP):
            for n, p in self.paths.items():
                if p.path == path:
                    lines.append(f"  {path:<4} {n}: {p.reason}")
        return "\n".join(lines)

    def _head_kwargs(self, labels: torch.Tensor) -> dict:
        """{"logits_to_keep": n} where the head may skip the positions before the first that
        predicts a label: their logits are unread and their output gradient is zero, so every
        other gradient keeps its bits. Not where the head's own parameters are extracted (their
        per-sample sums over tokens would add in another order), nor where the model cannot."""
        first = first_predicting(labels)
        return {"logits_to_keep": labels.shape[1] - first} if first and self._head_trims else {}

    def _forward_context(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        out: Mapping[str, torch.Tensor] | None = None,
        factored: Collection[str] = (),
    ) -> dict[str, torch.Tensor | Factors]:
        """input_ids, attention_mask, labels: [batch, length] (labels == -100 are ignored).
        Returns {component name: [batch, numel or sketch k] float32}, in the order of `names`.

        out: optional {component: contiguous float32 [batch, numel or k] on the model's device} to
        write into (and return): buffers reused across batches, or rows of the final destination.
        factored: components (each `factorable`) to return as `Factors` rather than formed; one
        that falls back to the loop in this pass comes back formed.
        """
        model, params = self.model, self.params
        out = out or {}
        refused = [n for n in factored if n not in self.names or not self.factorable(n)]
        if refused:
            raise ValueError(f"components {refused[:5]} cannot be returned factored (see GradientExtractor.factorable)")
        sinks = {n: _Sink(input_ids.shape[0], params[n], self.sketches.get(n), out.get(n)) for n in self.names}
        for n in factored:
            sinks[n].factors = []
        saved = {n: p.requires_grad for n, p in params.items()}
        was_training = model.training
        model.eval()
        self.batch_losses = None
        try:
            batched = [n for n in self.names if self.plan[n].path != LOOP]
            fallback = self._batched_pass(batched, sinks, input_ids, attention_mask, labels) if batched else {}
            for n, reason in fallback.items():
                self.paths[n] = ComponentPath(LOOP, reason)
                sinks[n].factors = None  # the loop forms it
            looped = [n for n in self.names if self.plan[n].path == LOOP or n in fallback]
            if looped:
                self._loop_pass(looped, sinks, input_ids, attention_mask, labels)
        finally:
            for n, p in params.items():
                p.requires_grad_(saved[n])
            model.train(was_training)
        return {n: _factors(sinks[n].factors) if sinks[n].factors else sinks[n].out for n in self.names}

    def _only_requires_grad(self, names: Sequence[str]) -> None:
        for p in self.params.values():
            p.requires_grad_(False)
        for n in names:
            self.params[n].requires_grad_(True)

    def _batched_pass(self, names, sinks, input_ids, attention_mask, labels) -> dict[str, str]:
        """Fill the sinks of `names` from one batched pass; returns {name: why it needs the loop}."""
        self._only_requires_grad(names)
        batch, length = input_ids.shape
        wanted: dict[nn.Module, list[tuple[str, str]]] = defaultdict(list)  # module -> [(attr, name)]
        for n in names:
            for module, attr in self.owners[id(self.params[n])]:
                wanted[module].append((attr, n))
        fallback: dict[str, str] = {}
        records: list[tuple[nn.Module, tuple, torch.Tensor, int]] = []  # (module, inputs, output, version)
        tracer = _ParamUse(
            {n: self.params[n] for n in names},
            {n: {id(m) for m, _ in self.owners[id(self.params[n])]} for n in names},
        )

        def give_up(module, reason):
            for _, n in wanted[module]:
                fallback.setdefault(n, f"{type(module).__name__}: {reason}")

        def enter(module, inputs):
            tracer.running.append(module)

        def keep(module, inputs, kwargs, output):
            tracer.running.pop()
            return self._keep(module, likes[module], inputs, kwargs, output, batch, length, records, give_up)

        likes = {m: stock_layer(m) for m in wanted}  # before our own hooks are on them
        handles = [
            h
            for m in wanted
            for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(keep, with_kwargs=True))
        ]
        try:
            with torch.enable_grad():
                with tracer.watching(), self._forward_context(input_ids.device.type):
                    logits = self.model(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        **self._forward_kwargs,
                        **self._head_kwargs(labels),
                    ).logits
                losses = per_sample_loss(logits, labels)  # [batch]
                self.batch_losses = losses.detach()
                total = losses.sum()
                outputs = [y for _, _, y, _ in records]
                grads = (
                    torch.autograd.grad(total, outputs, allow_unused=True)
                    if outputs and total.requires_grad
                    else [None] * len(outputs)
                )
        finally:
            for h in handles:
                h.remove()
        for n in tracer.stray:
            fallback.setdefault(n, "parameter used outside its module's forward")
        for module, _, y, version in records:
            if y._version != version:  # e.g. `embeds *= scale`: autograd would give dL/d(scaled), not dL/dy
                give_up(module, "its output is modified in place")
        replays: list[Replay] = []  # for the vmap path
        for (module, inputs, y, _), g in zip(records, grads):
            todo = [(attr, n) for attr, n in wanted[module] if n not in fallback]
            if g is None or not todo:  # this call does not reach the loss, or nothing left to do here
                continue
            g = g.detach().float()
            if y.shape[0] == batch * length and batch > 1:  # flattened [batch*tokens, ...] rows
                g, y = g.view(batch, length, *g.shape[1:]), y.view(batch, length, *y.shape[1:])
                inputs = (inputs[0].view(batch, length, *inputs[0].shape[1:]),)
            like = likes[module]
            if like is not None and all(attr in STOCK_LAYERS[like] for attr, _ in todo):
                x = inputs[0] if like is nn.Embedding else inputs[0].float()
                x = x.expand(batch, *x.shape[1:])  # a broadcast call: every sample used the same input
                for attr, n in todo:
                    self._stock_into(sinks[n], module, like, attr, x, g)
                continue
            replays.append(Replay(module, todo, inputs, y, g))
        for module, problem in self._vmap_all(replays, sinks).items():
            give_up(module, problem)
        return fallback

    def _stock_into(self, sink: _Sink, module, like, attr, x, g) -> None:
        """Add a stock layer's per-sample gradient of `attr` to `sink`: straight into its output
        for the first contribution; a sketched one in row blocks through one reused scratch buffer."""
        batch = g.shape[0]
        if sink.factors is not None:  # factorable: a stock Linear/Conv1D weight
            sink.factors.append((x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])))
            return
        param = getattr(module, attr)
        n_rows, cols = (1, param.numel()) if attr == "bias" else param.shape
        target = sink.whole()
        if target is not None:
            _stock_grad(module, like, attr, x, g, 0, n_rows, target)
            return
        step = n_rows if sink.sketch is None else max(1, min(n_rows, BLOCK_ELEMENTS // (batch * cols)))
        for r0, r1 in _row_blocks(n_rows, step):
            size = batch * (r1 - r0) * cols
            if self._scratch is None or self._scratch.numel() < size or self._scratch.device != g.device:
                self._scratch = torch.empty(max(size, min(BLOCK_ELEMENTS, batch * n_rows * cols)), device=g.device)
            block = _stock_grad(module, like, attr, x, g, r0, r1, self._scratch[:size].view(batch, -1))
            sink.add(r0, block, scratch=True)

    @staticmethod
    def _keep(module, like, inputs, kwargs, output, batch, length, records, give_up):
        """Forward hook: keep (inputs, output) of a call that can be split by sample."""
        tensors = list(_tensors((inputs, kwargs)))
        if kwargs or not torch.is_tensor(output) or not inputs or not torch.is_tensor(inputs[0]):
            give_up(module, "called with keyword or non-tensor arguments")
            return None
        if any(t.shape[0] != batch for t in tensors[1:]) or len(inputs) != len(tensors):
            give_up(module, "called with extra arguments not split by sample")
            return None
        if not output.requires_grad:
            return None  # a call under no_grad (or on frozen inputs only): no gradient flows through it
        lead = output.shape[0] if output.dim() else None
        if lead == batch and inputs[0].shape[0] in (batch, 1):
            pass
        elif lead == 1 and batch > 1 and inputs[0].shape[0] == 1:
            # A broadcast call (GPT-2 position embeddings: [1, tokens] -> [1, tokens, d]) would give
            # only the batch-summed gradient; an expanded view gives each sample its own row.
            output = output.expand(batch, *output.shape[1:])
        elif lead == batch * length and inputs[0].shape[0] == lead and like is not None and batch > 1:
            pass  # a stock layer on flattened [batch*tokens, d] rows (MoE routers): reshaped later
        else:
            give_up(module, f"called on {tuple(inputs[0].shape)} -> {tuple(output.shape)}, not one row per sample")
            return None
        records.append((module, tuple(a.detach() for a in inputs), output, output._version))
        return output

    def _vmap_all(self, replays, sinks) -> dict[nn.Module, str]:
        """Per-sample gradients of the vmap-path modules' own parameters; {module: why the loop
        must do it} for those that fail.

        Modules small enough (batch x their parameters <= BLOCK_ELEMENTS) go together through one
        vmap of their forwards over samples, each sample with its own copy of the parameters (a
        [batch, ...] leaf); one backward pass then gives every sample's gradient, and the replayed
        outputs are checked against the batch outputs (the primal check). One vmap call for all
        of them, not a vmap of a VJP per module: a third of the time on small models. The others,
        all of them when the joint call fails, and any with a non-finite result go one by one in
        sample blocks (_vmap_grads).
        """
        from torch.func import functional_call, vmap

        problems: dict[nn.Module, str] = {}
        joint = [r for r in replays if self._replay_elements(r) <= BLOCK_ELEMENTS]
        single = [r for r in replays if self._replay_elements(r) > BLOCK_ELEMENTS]
        if joint:
            batch = joint[0].out_grad.shape[0]
            leaves, argss, in_dims = [], [], []
            for module, todo, inputs, *_ in joint:
                leaves.append(
                    {
                        a: getattr(module, a).detach().float().expand(batch, *getattr(module, a).shape).clone()
                        for a, _ in todo
                    }
                )
                args = [a if a.dtype in (torch.long, torch.int, torch.bool) else a.float() for a in inputs]
                argss.append(args)
                in_dims.append([0 if a.shape[0] == batch else None for a in args])

            def forward(params, argss):  # one sample of every module: inputs as the module saw them
                outs = []
                for (module, *_), p, xs, dims in zip(joint, params, argss, in_dims):
                    xs = [x[None] if d == 0 else x for x, d in zip(xs, dims)]
                    outs.append(functional_call(module, p, tuple(xs))[0])
                return outs

            try:
                with torch.enable_grad():
                    for leaf in leaves:
                        for t in leaf.values():
                            t.requires_grad_(True)
                    outs = vmap(forward, in_dims=([{a: 0 for a in leaf} for leaf in leaves], in_dims))(leaves, argss)
                    flat = [t for leaf in leaves for t in leaf.values()]
                    grads = torch.autograd.grad(outs, flat, [r.out_grad for r in joint], allow_unused=True)
            except Exception:  # data-dependent control flow, in-place ops, ...: find out which, one by one
                single, joint = replays, []
            else:
                grads = iter(grads)
                for replay, out in zip(joint, outs):
                    got = {n: next(grads) for _, n in replay.todo}
                    if not self._replays_batch(out.detach(), replay.output):
                        problems[replay.module] = "its forward on one sample does not reproduce its batch output"
                    elif not all(bool(torch.isfinite(v).all()) for v in got.values() if v is not None):
                        # A NaN in the output gradient where the module ignores it (padded positions
                        # of an embedding's padding row) leaks into this backward, not into a VJP
                        # per sample: that module goes the single way.
                        single.append(replay)
                    else:
                        for n, grad in got.items():
                            if grad is not None:
                                sinks[n].add(0, grad.reshape(batch, -1))
        for module, todo, inputs, y, g in single:
            problem = self._vmap_grads(module, todo, inputs, y, g, sinks)
            if problem:
                problems[module] = problem
        return problems

    @staticmethod
    def _replay_elements(replay: Replay) -> int:
        return replay.out_grad.shape[0] * sum(getattr(replay.module, a).numel() for a, _ in replay.todo)

    def _replays_batch(self, out: torch.Tensor, y: torch.Tensor, rows: slice = slice(None)) -> bool:
        """The primal check: does the per-sample replay `out` reproduce the batch output y[rows]?"""
        want = y.detach()[rows].float()
        if out.shape != want.shape:
            return False
        tol = PRIMAL_RTOL_AUTOCAST if self.autocast_dtype is not None else PRIMAL_RTOL
        return float((out - want).abs().max()) <= tol * (float(y.detach().abs().max()) + 1e-30)

    def _vmap_grads(self, module, todo, inputs, y, g, sinks) -> str | None:
        """Per-sample gradients of `module`'s own parameters by vmap over samples of the VJP of its
        forward; None on success, else why the loop must do it."""
        from torch.func import functional_call, vjp, vmap

        batch = g.shape[0]
        attrs = [attr for attr, _ in todo]
        params = {a: getattr(module, a).detach().float() for a in attrs}
        args = [a if a.dtype in (torch.long, torch.int, torch.bool) else a.float() for a in inputs]
        in_dims = tuple(0 if a.shape[0] == batch else None for a in args)

        def one(gs, *xs):  # one sample: xs as the module saw them, without the batch dim
            xs = [x[None] if d == 0 else x for x, d in zip(xs, in_dims)]
            out, pull = vjp(lambda p: functional_call(module, p, tuple(xs))[0], params)
            return out, pull(gs)[0]

        rows = max(1, BLOCK_ELEMENTS // max(1, sum(p.numel() for p in params.values())))
        for s0 in range(0, batch, rows):
            sl = slice(s0, min(s0 + rows, batch))
            try:
                out, grads = vmap(one, in_dims=(0, *in_dims))(
                    g[sl], *[a[sl] if d == 0 else a for a, d in zip(args, in_dims)]
                )
            except Exception as e:  # data-dependent control flow, in-place ops, ...
                return f"vmap of its forward failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            if not self._replays_batch(out, y, sl):
                return "its forward on one sample does not reproduce its batch output"
            for attr, n in todo:
                sinks[n].add(0, grads[attr].reshape(sl.stop - sl.start, -1), samples=sl)
        return None

    def _loop_pass(self, names, sinks, input_ids, attention_mask, labels) -> None:
        """Exact fall-back: one backward per sample, on the sample without its padding."""
        self._only_requires_grad(names)
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        params = [self.params[n] for n in names]
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()  # drop padding: a bs=1 pass needs none
            with torch.enable_grad():
                with self._forward_context(input_ids.device.type):
                    logits = self.model(input_ids=input_ids[b, keep][None], **self._forward_kwargs).logits
                loss = per_sample_loss(logits, labels[b, keep][None]).sum()
                grads = (
                    torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
                )
            for n, g in zip(names, grads):
                one = _Sink(1, self.params[n], sinks[n].sketch)
                if g is not None:
                    one.add(0, g.detach().reshape(1, -1).float())
                rows[n].append(one.out)  # [1, numel or k]
        for n in names:
            sinks[n].set(torch.cat(rows[n]))


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
    """Per-sample gradients of each sample's mean loss over its labelled tokens (one-off use of
    `GradientExtractor`; see it for the arguments). Returns {component: [batch, numel] float32}."""
    extractor = GradientExtractor(model, components, sketches=sketches, autocast_dtype=autocast_dtype)
    return extractor(input_ids, attention_mask, labels)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
