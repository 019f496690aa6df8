"""The time to represent new samples with each method, measured in one run on the same samples:
gradient extraction of what the method needs (only the selected components for select methods:
backpropagation stops at the lowest one) plus its reduction (projection).

The rows go into the costs table (tdabench.costs_table, results/evaluation/costs.parquet).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from tdabench.components import short_name
from tdabench.device import synchronize
from tdabench.extraction import Extraction
from tdabench.models import Encoded
from tdabench.projection import ProjectionConfig, Projector, method_config
from tdabench.sections import CostsConfig
from tdabench.selection import SelectionTable

log = logging.getLogger(__name__)


class TimedExtraction:
    """Per-sample gradients of a fixed set of samples, timed (after a warm-up on two samples)."""

    def __init__(self, extraction: Extraction, examples: Sequence[Encoded], pad_id: int):
        self.extraction = extraction
        self.batches = [batch for _, batch in extraction.batches(examples, pad_id)]

    def __call__(self, names: list[str]) -> tuple[dict[str, torch.Tensor], float]:
        """({name: [n, d]}, seconds) for the given components over all samples."""
        # warm-up: the subset's extractor is built and the code paths run once, on the first two
        # samples (a batch, as the extractor sees one; a whole batch would cost as much as half of
        # what is timed at 16 samples)
        self.extraction({k: v[:2] for k, v in self.batches[0].items()}, names)
        out = self.extraction.buffers(sum(b["input_ids"].shape[0] for b in self.batches), names)
        synchronize(self.extraction.device)
        start, row = time.perf_counter(), 0
        for b in self.batches:  # each batch's gradients straight into their rows of `out`
            size = b["input_ids"].shape[0]
            self.extraction(b, names, out={n: o[row : row + size] for n, o in out.items()})
            row += size
        synchronize(self.extraction.device)  # (gradients come back to the host, which waits anyway)
        return out, time.perf_counter() - start


def reduce_seconds(
    grads: dict[str, torch.Tensor], names: list[str], cfg: ProjectionConfig, index: dict[str, int]
) -> float:
    """Time to project the samples' gradients of `names` with `cfg` (matrix generation included)."""
    proj = Projector(cfg, [grads[n].shape[1] for n in names])
    out = torch.zeros(next(iter(grads.values())).shape[0], proj.out_dim).numpy()
    start = time.perf_counter()
    for pos, n in enumerate(names):
        proj.add(out, index[n] if proj.dims is None else pos, grads[n])
    return time.perf_counter() - start


class ReduceTimes:
    """Projection times shared by the settings of one costs job.

    A projection's time depends on the number of samples and on the components' shapes, not on
    the gradients' values, so each (projection, components, samples) is timed once: a second
    setting's rows carry the first one's time instead of drawing every random block again (at
    135M a `blockwise` projection to 4,096 dims draws 3e9 Gaussian numbers).
    """

    def __init__(self) -> None:
        self.seconds: dict[tuple, float] = {}

    def __call__(
        self, grads: dict[str, torch.Tensor], names: list[str], cfg: ProjectionConfig, index: dict[str, int]
    ) -> float:
        n = next(iter(grads.values())).shape[0]
        key = (cfg, tuple(names), n, tuple(grads[c].shape[1] for c in names))
        if key not in self.seconds:
            self.seconds[key] = reduce_seconds(grads, names, cfg, index)
        return self.seconds[key]


def measure_setting(
    setting: str,
    extract: TimedExtraction,
    selection: SelectionTable,
    cfg: CostsConfig,
    n: int,
    reduce: ReduceTimes | None = None,
) -> list[dict]:
    """Rows of one query setting: every method's time on the same `n` samples (split 0's choices).
    reduce: projection times already measured for another setting (see ReduceTimes)."""
    reduce = reduce if reduce is not None else ReduceTimes()
    everything = extract.extraction.names
    index = {name: i for i, name in enumerate(everything)}
    greedy = selection.greedy_set(0)
    sets = {
        ("full", None, None): everything,
        ("best_single", None, None): selection.best_single(0),
        ("greedy", None, None): greedy,
    }
    for budget, names in selection.budget_sets(0):
        sets[("greedy_budget", f"budget {budget:g}", budget)] = names
    rows = []

    def row(method, variant, k, budget, names, extract_s, reduce_s=0.0):
        label = "+".join(short_name(c) for c in names) if len(names) < len(everything) else "all"
        rows.append(
            {
                "setting": setting,
                "method": method,
                "variant": variant,
                "k": k,
                "budget": budget,
                "components": label,
                "n_samples": n,
                "extract_seconds": extract_s,
                "reduce_seconds": reduce_s,
                "seconds_per_sample": (extract_s + reduce_s) / n,
            }
        )

    # Each distinct component set is timed once (a budget's set is often the greedy set, and
    # select-then-project extracts the greedy set at every k): the same numbers, fewer passes.
    full_grads, full_s = extract(everything)
    greedy_grads, greedy_s = (full_grads, full_s) if greedy == everything else extract(greedy)
    timed = {tuple(everything): full_s, tuple(greedy): greedy_s}
    for (method, variant, budget), names in sets.items():
        if tuple(names) not in timed:
            timed[tuple(names)] = extract(names)[1]
        row(method, variant, None, budget, names, timed[tuple(names)])
    for method in cfg.methods:
        for k in cfg.dims:
            if method == "select_then_project":
                if k >= sum(greedy_grads[c].shape[1] for c in greedy):
                    continue
                proj = ProjectionConfig(cfg.select_kind, k, 0, cfg.nonzeros)
                row(method, method, k, None, greedy, greedy_s, reduce(greedy_grads, greedy, proj, index))
            else:
                proj = method_config(method, k, 0, cfg.nonzeros)
                row(
                    "projection",
                    method,
                    k,
                    None,
                    everything,
                    full_s,
                    reduce(full_grads, everything, proj, index),
                )
    log.info("%s: %d samples; full gradient %.1f ms/sample", setting, n, full_s / n * 1e3)
    return rows
