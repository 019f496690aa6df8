"""Stage `costs`: the time to represent new samples with each method, measured in one run on the
same samples: gradient extraction of what the method needs (only the selected components for
select methods: backpropagation stops at the lowest one) plus its reduction (projection)."""

from __future__ import annotations

import logging
import time

import polars as pl
import torch

from tdabench.components import component_registry, match_components, short_name
from tdabench.gradients import iter_batches, per_sample_gradients
from tdabench.io import write_parquet
from tdabench.models import collate, encode, load_model
from tdabench.pipeline.common import JobContext, set_threads
from tdabench.projection import CountSketch, Projector, ProjectionConfig, method_config, name_key

log = logging.getLogger(__name__)


class Extractor:
    """Per-sample gradients of a fixed set of samples, as the gradients stage computes them."""

    def __init__(self, model, tokenizer, prompts, responses, p):
        self.model, g, tok = model, p["gradients"], p["tokenize"]
        registry = {c.name: c for c in component_registry(model)}
        self.names = match_components(list(registry), g["components"])
        cap = g["max_component_dim"]
        self.sketches = {n: CountSketch(registry[n].numel, cap, g["sketch_seed"], name_key(n))
                         for n in self.names if cap is not None and registry[n].numel > cap}
        self.autocast = getattr(torch, g["autocast"]) if g["autocast"] else None
        examples = [encode(tokenizer, a, b, tok["max_length"], tok["loss_on"]) for a, b in zip(prompts, responses)]
        self.batches = [collate(examples[rows], tokenizer.pad_token_id)
                        for rows in iter_batches(len(examples), g["batch_size"])]

    def __call__(self, names: list[str]) -> tuple[dict[str, torch.Tensor], float]:
        """({name: [n, d]}, seconds) for the given components over all samples."""
        b = self.batches[0]
        per_sample_gradients(self.model, b["input_ids"], b["attention_mask"], b["labels"], names[:1],
                             sketches=self.sketches)  # warm-up
        start = time.perf_counter()
        parts = [per_sample_gradients(self.model, b["input_ids"], b["attention_mask"], b["labels"], names,
                                      sketches=self.sketches, autocast_dtype=self.autocast) for b in self.batches]
        seconds = time.perf_counter() - start
        return {n: torch.cat([part[n] for part in parts]) for n in names}, seconds


def reduce_seconds(grads: dict[str, torch.Tensor], names: list[str], cfg: ProjectionConfig,
                   index: dict[str, int]) -> float:
    """Time to project the samples' gradients of `names` with `cfg` (matrix generation included)."""
    proj = Projector(cfg, [grads[n].shape[1] for n in names])
    out = torch.zeros(next(iter(grads.values())).shape[0], proj.out_dim).numpy()
    start = time.perf_counter()
    for pos, n in enumerate(names):
        proj.add(out, index[n] if proj.dims is None else pos, grads[n])
    return time.perf_counter() - start


def main(job: JobContext, mlrun) -> None:
    set_threads(job.threads)
    p = job.params
    model, tokenizer = load_model(p["model"])
    queries = pl.read_parquet(job.input["queries"])
    rows = []
    for setting, sel_path in zip(p["settings"], job.input["selection"]):
        sample = queries.filter(pl.col("setting") == setting).sort("id").head(p["cost_samples"])
        n = sample.height
        extract = Extractor(model, tokenizer, sample["prompt"].to_list(), sample["response"].to_list(), p)
        index = {name: i for i, name in enumerate(extract.names)}
        selection = pl.read_parquet(sel_path).filter(pl.col("split") == 0)
        greedy = selection.filter(pl.col("kind") == "greedy").sort("step")["component"].to_list()
        chosen = selection.filter((pl.col("kind") == "greedy") & pl.col("chosen"))["step"][0]
        sets = {("full", None, None): extract.names,
                ("best_single", None, None): selection.filter((pl.col("kind") == "single") & pl.col("chosen"))["component"].to_list(),
                ("greedy", None, None): greedy[:chosen]}
        budgeted = selection.filter(pl.col("kind") == "budget").sort("budget", "step")
        for (budget,), run in budgeted.group_by("budget", maintain_order=True):
            steps = run.filter(pl.col("chosen"))["step"][0]
            sets[("greedy_budget", f"budget {budget:g}", budget)] = run["component"].to_list()[:steps]

        def row(method, variant, k, budget, names, extract_s, reduce_s=0.0):
            rows.append({"setting": setting, "method": method, "variant": variant, "k": k, "budget": budget,
                         "components": "+".join(short_name(c) for c in names) if len(names) < len(extract.names) else "all",
                         "n_samples": n, "extract_seconds": extract_s, "reduce_seconds": reduce_s,
                         "seconds_per_sample": (extract_s + reduce_s) / n})

        full_grads, full_s = extract(extract.names)
        for (method, variant, budget), names in sets.items():
            seconds = full_s if method == "full" else extract(names)[1]
            row(method, variant, None, budget, names, seconds)
        for method in p["methods"]:
            for k in p["dims"]:
                if method == "select_then_project":
                    names = greedy[:chosen]
                    grads, seconds = extract(names)
                    if k >= sum(grads[c].shape[1] for c in names):
                        continue
                    cfg = ProjectionConfig(p["select_kind"], k, 0, p["nonzeros"])
                    row(method, method, k, None, names, seconds, reduce_seconds(grads, names, cfg, index))
                else:
                    cfg = method_config(method, k, 0, p["nonzeros"])
                    row("projection", method, k, None, extract.names, full_s,
                        reduce_seconds(full_grads, extract.names, cfg, index))
        log.info("%s: %d samples; full gradient %.1f ms/sample", setting, n, full_s / n * 1e3)
    table = pl.DataFrame(rows, schema_overrides={"variant": pl.Utf8, "k": pl.Int64, "budget": pl.Float64})
    write_parquet(table, job.output["costs"])
    for r in table.iter_rows(named=True):
        name = "_".join(str(x) for x in (r["setting"], r["method"], r["variant"], r["k"]) if x is not None)
        mlrun.log_metrics({f"ms_per_sample.{name}".replace(" ", "_"): r["seconds_per_sample"] * 1e3})
