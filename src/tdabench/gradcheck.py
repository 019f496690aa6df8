"""Self-check of the gradient extractor against the slow obvious reference: a bs=1
`loss.backward()` loop, one sample at a time without its padding, cloning each `.grad`.

Error of one component on one sample (both dense, or both through the component's count sketch):
    ||got - ref|| / max(||ref||, FLOOR * ||ref over all checked components||)
The floor keeps components whose true gradient is (analytically) zero — an attention key bias
shifts every score of a query equally, so softmax ignores it — from dividing rounding noise by
rounding noise; a wrong gradient there still shows, as an error of the sample's whole gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tdabench.errors import StudyError
from tdabench.gradients import GradientExtractor, no_cache_kwargs, per_sample_loss

FLOOR = 1e-2
DEFAULT_TOLERANCE = 1e-4  # fp32
DEFAULT_TOLERANCE_AUTOCAST = 5e-2  # forward under bf16/fp16 autocast: batched and bs=1 round differently
LOSS_GAP = 1e-6  # relative gap between batched and bs=1 loss beyond fp32 rounding


class GradientCheckError(StudyError, RuntimeError):
    """The extractor disagrees with the bs=1 loop on some component."""


@dataclass
class CheckReport:
    samples: list[int]  # rows of the batch that were checked
    errors: dict[str, float]  # component -> worst relative error over the checked samples
    tolerance: float
    paths: dict[str, str] = field(default_factory=dict)  # component -> path it took
    seconds: float = 0.0  # time of the reference loop

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def failing(self) -> dict[str, float]:
        return {n: e for n, e in self.errors.items() if not e <= self.tolerance}  # NaN fails too

    def table(self, only_failing: bool = False) -> str:
        rows = self.failing if only_failing else self.errors
        width = max((len(n) for n in rows), default=9)
        lines = [f"{'component':<{width}}  {'path':<4}  rel. error"]
        for n, e in sorted(rows.items(), key=lambda kv: -kv[1] if kv[1] == kv[1] else float("-inf")):
            lines.append(f"{n:<{width}}  {self.paths.get(n, '?'):<4}  {e:.2e}")
        return "\n".join(lines)


def reference_gradients(
    model, input_ids, attention_mask, labels, names: Sequence[str], rows: Sequence[int], autocast_dtype=None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({component: [len(rows), numel]}, losses [len(rows)]) by one loss.backward() per sample, on its
    unpadded tokens."""
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()
    out = {n: [] for n in names}
    losses = []
    forward_kwargs = no_cache_kwargs(model)
    try:
        for p in params.values():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
        for b in rows:
            keep = attention_mask[b].bool()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                ctx = (
                    torch.autocast(input_ids.device.type, dtype=autocast_dtype)
                    if autocast_dtype
                    else torch.autocast(input_ids.device.type, enabled=False)
                )
                with ctx:
                    logits = model(input_ids=input_ids[b, keep][None], **forward_kwargs).logits
                loss = per_sample_loss(logits, labels[b, keep][None]).sum()
                losses.append(float(loss.detach()))
                if loss.requires_grad:
                    loss.backward()
            for n in names:
                g = params[n].grad
                out[n].append(
                    torch.zeros(params[n].numel(), device=params[n].device)
                    if g is None
                    else g.detach().reshape(-1).float().clone()
                )
            model.zero_grad(set_to_none=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    return {n: torch.stack(v) for n, v in out.items()}, torch.tensor(losses, dtype=torch.float64)


def relative_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Worst relative error per component over the rows of `ref` (see the module docstring)."""
    first = next(iter(ref.values()))
    total = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    for r in ref.values():
        total += r.double().pow(2).sum(1)
    floor = FLOOR * total.sqrt()  # [rows]
    errors = {}
    for n, r in ref.items():
        diff = (got[n].to(r.device).double() - r.double()).norm(dim=1)
        denom = torch.maximum(r.double().norm(dim=1), floor)
        err = torch.where(denom > 0, diff / denom.clamp(min=1e-300), torch.where(diff > 0, torch.inf, 0.0))
        errors[n] = float(err.max()) if torch.isfinite(got[n]).all() else float("nan")
    return errors


def pick_samples(attention_mask: torch.Tensor, n: int) -> list[int]:
    """The shortest and the longest sample first (most and least padding), then the others in order."""
    lengths = attention_mask.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    picked = list(dict.fromkeys([order[0], order[-1], *range(len(lengths))]))
    return picked[: max(0, n)]


def _diagnosis(extractor: GradientExtractor, rows: list[int], ref_losses: torch.Tensor) -> str:
    """Why a check failed: the model's own batched loss differs from its bs=1 loss (it depends on
    padding or on the other samples), or a layer that the extractor computes wrongly."""
    if extractor.batch_losses is not None:
        batched = extractor.batch_losses[rows].double().cpu()
        gap = float(((batched - ref_losses).abs() / ref_losses.abs().clamp(min=1e-12)).max())
        if gap > LOSS_GAP:
            return (
                f"The model's own loss already differs between the batch and the sample alone (relative "
                f"{gap:.1e}): its forward depends on padding or on the other samples of the batch. "
                "Extract with gradients.batch_size: 1 (no padding), which is exact for any model."
            )
    return (
        "The batched loss matches the bs=1 loss, so a layer is computed wrongly by the extractor: leave "
        "the components above out of gradients.components, or report the model's architecture."
    )


def check_extractor(
    extractor: GradientExtractor,
    input_ids,
    attention_mask,
    labels,
    samples: int = 2,
    tolerance: float | None = None,
    grads: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], CheckReport]:
    """Run `extractor` on the batch (unless `grads` are given) and compare `samples` of its rows
    with the bs=1 loop. Returns (the batch's gradients, report); raises GradientCheckError, with a
    table of the failing components, when any error exceeds `tolerance` (default: 1e-4 in fp32,
    5e-2 under autocast)."""
    if grads is None:
        grads = extractor(input_ids, attention_mask, labels)
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE if extractor.autocast_dtype is None else DEFAULT_TOLERANCE_AUTOCAST
    if not (0 < tolerance < math.inf):  # also refuses NaN, which a schema minimum lets through
        raise ValueError(
            f"config key gradients.verify_tolerance: {tolerance!r}; use a positive finite number "
            "(e.g. 1e-4) or null for the default"
        )
    rows = pick_samples(attention_mask, samples)
    start = time.perf_counter()
    ref, ref_losses = reference_gradients(
        extractor.model, input_ids, attention_mask, labels, extractor.names, rows, extractor.autocast_dtype
    )
    seconds = time.perf_counter() - start
    for n, sketch in extractor.sketches.items():
        ref[n] = sketch(ref[n])
    bad = [n for n in extractor.names if not (torch.isfinite(ref[n]).all() and torch.isfinite(grads[n][rows]).all())]
    if bad or not torch.isfinite(ref_losses).all():
        raise GradientCheckError(
            f"non-finite (NaN/inf) loss or per-sample gradients on samples {rows} of the batch (losses "
            f"{[round(float(v), 4) for v in ref_losses]}; components {bad[:5]}{' ...' if len(bad) > 5 else ''}): the "
            "model's loss is not finite, so no gradient can be trusted; check the model (a diverged fine-tune, "
            "e.g. too high a learning rate) and its inputs"
        )
    errors = relative_errors({n: grads[n][rows] for n in extractor.names}, ref)
    report = CheckReport(rows, errors, tolerance, {n: p.path for n, p in extractor.paths.items()}, seconds)
    if report.failing:
        raise GradientCheckError(
            f"per-sample gradients disagree with the bs=1 loss.backward() loop on {len(report.failing)} of "
            f"{len(errors)} components (tolerance {tolerance:g}, samples {rows} of the batch):\n"
            f"{report.table(only_failing=True)}\n{_diagnosis(extractor, rows, ref_losses)}"
        )
    return grads, report
