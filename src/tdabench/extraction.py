"""What to extract from a model and how: the one recipe behind every per-sample gradient we compute.

`Extraction` matches the configured component patterns against the model, builds the count
sketches of components larger than `max_component_dim`, and runs `GradientExtractor` over padded
batches (optionally under autocast) on the model's device. The gradients stage, the cost
measurement and the benchmarks all call it, so a stored gradient, a timed gradient and a
benchmarked gradient are the same thing.

Batches go to the device the model is on; gradients (and count sketches) are computed there and
come back to the host per component. A batch that runs out of device memory is split in halves
(logged), and later batches keep the smaller size (tdabench.device.halving).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tdabench.components import Component, component_registry, match_components
from tdabench.device import halving
from tdabench.gradcheck import CheckReport, check_extractor
from tdabench.gradients import GradientExtractor, iter_batches
from tdabench.models import Encoded, collate
from tdabench.projection import CountSketch, name_key
from tdabench.representation import Dense, Representation, concat
from tdabench.sections import ExtractionConfig


class Extraction:
    """Per-sample gradients of `model` as configured: components, sketches, batching, autocast."""

    def __init__(self, model: torch.nn.Module, cfg: ExtractionConfig):
        self.model, self.cfg = model, cfg
        registry = {c.name: c for c in component_registry(model)}
        self.names: list[str] = match_components(list(registry), list(cfg.components))
        self.components: list[Component] = [registry[n] for n in self.names]
        cap = cfg.max_component_dim
        # Stored with the gradients (store attrs), so a reader knows how each component was reduced.
        self.sketch_info: dict[str, dict] = {
            c.name: {"kind": "countsketch", "k": cap, "seed": cfg.sketch_seed, "key": name_key(c.name)}
            for c in self.components
            if cap is not None and c.numel > cap
        }
        self.sketches = {
            n: CountSketch(registry[n].numel, s["k"], s["seed"], s["key"]) for n, s in self.sketch_info.items()
        }
        self.autocast_dtype = getattr(torch, cfg.autocast) if cfg.autocast else None
        self._extractors: dict[tuple[str, ...], GradientExtractor] = {}
        self.device = next(model.parameters()).device
        self.max_rows: int | None = None  # set below batch_size after an out-of-memory split

    @property
    def stored_dims(self) -> list[int]:
        """Per component: the dimension a gradient takes (its sketch size when sketched)."""
        return [self.sketch_info[c.name]["k"] if c.name in self.sketch_info else c.numel for c in self.components]

    def extractor(self, names: Sequence[str] | None = None) -> GradientExtractor:
        """The extractor of `names` (default: every configured component); built once per subset,
        so a subset's backward pass stops at its lowest component."""
        key = tuple(self.names if names is None else names)
        unknown = [n for n in key if n not in self.names]
        if unknown:
            raise ValueError(f"components {unknown} are not among the extracted ones ({len(self.names)} configured)")
        if key not in self._extractors:
            self._extractors[key] = GradientExtractor(
                self.model, list(key), sketches=self.sketches, autocast_dtype=self.autocast_dtype
            )
        return self._extractors[key]

    def batches(self, examples: Sequence[Encoded], pad_id: int) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        """(rows, padded batch) over `examples` in order, `batch_size` at a time."""
        for rows in iter_batches(len(examples), self.cfg.batch_size):
            yield rows, collate(list(examples[rows]), pad_id)

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        names: Sequence[str] | None = None,
        out: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """{component: [batch, stored dim] float32, on the host} of one padded batch.

        out: optional {component: contiguous float32 [batch, stored dim] host tensor} to write into
        and return (see `buffers`): gradients go straight there rather than into new memory (for
        the components it names; the others come back in new memory).
        """
        return {n: r.tensor for n, r in self.represent(batch, names, out).items()}

    def represent(
        self,
        batch: dict[str, torch.Tensor],
        names: Sequence[str] | None = None,
        out: dict[str, torch.Tensor] | None = None,
        factored: Sequence[str] = (),
        on_device: bool = False,
    ) -> dict[str, Representation]:
        """{component: `Dense` [batch, stored dim] float32 or `Factors`} of one padded batch.

        out: as for `__call__`. factored: components to return as `Factors` (layer inputs and
        output gradients; see GradientExtractor). on_device: leave results on the model's device
        (no `out` then).
        """
        extractor = self.extractor(names)
        on_host, out = self.device.type == "cpu", out or {}

        def run(rows: slice) -> dict[str, Representation]:
            part = self.to_device(batch, rows)
            into = {n: out[n][rows] for n in extractor.names if n in out} if on_host else None
            grads = extractor(part["input_ids"], part["attention_mask"], part["labels"], out=into, factored=factored)
            reps = {n: g if n in factored else Dense(g) for n, g in grads.items()}
            if on_device:
                return reps
            return {
                n: (r if on_host else Dense(out[n][rows].copy_(r.tensor))) if n in out else r.host()
                for n, r in reps.items()
            }

        n = batch["input_ids"].shape[0]
        start = min(n, self.max_rows or n)
        parts, rows = halving(run, n, start, "per-sample gradients")
        if rows < start:  # split after running out of memory: later batches keep the smaller size
            self.max_rows = rows
        return {k: Dense(out[k]) if k in out else concat([p[k] for p in parts]) for k in extractor.names}

    def factorable(self, names: Sequence[str] | None = None) -> list[str]:
        """Those of `names` (default: all) that can come back as `Factors`."""
        extractor = self.extractor()
        return [n for n in (self.names if names is None else names) if extractor.factorable(n)]

    def buffers(self, rows: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Host output buffers for `rows` samples, to reuse batch after batch ({component: [rows,
        stored dim]}; pass `{n: b[:size]}` as `out`). What a call wrote stays valid until the next."""
        dims = dict(zip(self.names, self.stored_dims))
        return {n: torch.empty(rows, dims[n]) for n in (self.names if names is None else names)}

    def to_device(self, batch: dict[str, torch.Tensor], rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        return {k: v[rows].to(self.device, non_blocking=True) for k, v in batch.items()}

    def check(
        self, batch: dict[str, torch.Tensor], samples: int, tolerance: float | None
    ) -> tuple[dict[str, torch.Tensor], CheckReport]:
        """Gradients of `batch` checked on `samples` rows against a bs=1 loss.backward() loop
        (raises GradientCheckError on a mismatch; see tdabench.gradcheck)."""
        part = self.to_device(batch)
        grads, report = check_extractor(
            self.extractor(),
            part["input_ids"],
            part["attention_mask"],
            part["labels"],
            samples=samples,
            tolerance=tolerance,
        )
        return {n: g.cpu() for n, g in grads.items()}, report
