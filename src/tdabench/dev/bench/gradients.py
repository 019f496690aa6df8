"""`bench gradients`: per-sample gradients of ours (all components, selections) against the bs=1
reference loop, a plain batched forward+backward and, with --peers, other extractors; each
contender's agreement with the loop is checked on the same batch."""

from __future__ import annotations

from pathlib import Path

import torch

from tdabench.dev.bench.kit import Contender, fmt, interleave, load, machine, peak_rss_mb, rates
from tdabench.dev.bench.workload import build

GREEDY_SET = "results/selection/paraphrased.parquet"


def greedy_selection(names: list[str]) -> tuple[list[str], str]:
    """The default study's chosen greedy set if it was run here, else a fixed stand-in."""
    from tdabench.components import match_components

    path = Path(GREEDY_SET)
    if path.exists():
        from tdabench.selection import SelectionTable

        picked = [c for c in SelectionTable.read(path).greedy_set(0) if c in names]
        if picked:
            return picked, f"greedy set from {path} ({len(picked)} components)"
    return match_components(names, ["lm_head", "mlp@-1"]), "stand-in set lm_head + last MLP (no greedy result here)"


def gradient_contenders(model, ids, mask, labels, batch_size: int, peers: bool) -> tuple[list[Contender], dict]:
    """Every contender of the gradients benchmark (round r processes batch r, cycling), and the
    per-sample functions among them ({name: fn(ids, mask, labels)}: ours on every tensor and each
    peer, built once) for the agreement check."""
    from tdabench.components import component_registry, match_components
    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.gradients import iter_batches, per_sample_loss

    batches = list(iter_batches(ids.shape[0], batch_size))
    names = [c.name for c in component_registry(model)]

    def rows(r):
        return batches[r % len(batches)]

    def units(r):
        return rows(r).stop - rows(r).start

    def per_sample(comps):  # as the gradients stage runs it: into output buffers reused batch after batch
        extraction = Extraction(model, ExtractionConfig(tuple(comps), batch_size, None, 0, None))
        buffers = extraction.buffers(batch_size)

        def fn(i, m, lab):
            out = {n: b[: i.shape[0]] for n, b in buffers.items()}
            return extraction({"input_ids": i, "attention_mask": m, "labels": lab}, out=out)

        return fn

    def on_batch(fn):
        return lambda r: fn(ids[rows(r)], mask[rows(r)], labels[rows(r)])

    def reference(r):  # what the paper's reference code does: one sample at a time
        for b in range(rows(r).start, rows(r).stop):
            keep = mask[b].bool()
            model.zero_grad(set_to_none=True)
            per_sample_loss(model(input_ids=ids[b, keep][None]).logits, labels[b, keep][None]).sum().backward()
            [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    def plain(r):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[rows(r)], attention_mask=mask[rows(r)]).logits
        per_sample_loss(logits, labels[rows(r)]).sum().backward()

    greedy, note = greedy_selection(names)
    linear = [f"{m}.weight" for m, module in model.named_modules() if type(module) is torch.nn.Linear]
    linear = [n for n in linear if n in names]  # (a head tied to the embedding is the embedding's tensor)
    fns = {"a_all": per_sample(names), "b_linear": per_sample(linear)}
    if peers:
        from tdabench.dev.peers import available

        fns |= {f"peer_{name}": make(model) for name, make in available().items()}
    contenders = [
        Contender("a_all", on_batch(fns["a_all"]), units, f"{len(names)} tensors"),
        Contender("b_last_mlp", on_batch(per_sample(match_components(names, ["mlp@-1"]))), units, "last layer's MLP"),
        Contender("b_greedy", on_batch(per_sample(greedy)), units, note),
        Contender("b_linear", on_batch(fns["b_linear"]), units, f"{len(linear)} nn.Linear weights (as Bergson)"),
        Contender("c_reference_loop", reference, units, f"{len(names)} tensors"),
        Contender("d_plain_fwd_bwd", plain, units, "no per-sample gradients"),
    ]
    contenders += [Contender(name, on_batch(fn), units) for name, fn in fns.items() if name.startswith("peer_")]
    return contenders, fns


def agreement(model, contender_fns: dict[str, object], ids, mask, labels, samples: int = 2) -> dict[str, tuple]:
    """{contender: (tensors covered, worst relative error)} on `samples` rows of the first batch,
    against the bs=1 loss.backward() loop (tdabench.gradcheck)."""
    from tdabench.gradcheck import pick_samples, reference_gradients, relative_errors

    names = [n for n, _ in model.named_parameters()]
    picked = pick_samples(mask, samples)
    ref, _ = reference_gradients(model, ids, mask, labels, names, picked)
    out = {}
    for name, fn in contender_fns.items():
        got = {n: g.detach().cpu() for n, g in fn(ids, mask, labels).items()}
        covered = [n for n in names if n in got]
        errors = relative_errors({n: got[n][picked] for n in covered}, {n: ref[n].cpu() for n in covered})
        out[name] = (len(covered), max(errors.values(), default=float("nan")))
    return out


def run(args) -> None:
    from tdabench.device import describe, resolve_device, synchronize

    where = resolve_device(args.device)
    model, ids, mask, labels = build(args.model, args.samples, args.length)
    model.to(where)
    ids, mask, labels = ids.to(where), mask.to(where), labels.to(where)
    contenders, fns = gradient_contenders(model, ids, mask, labels, args.batch_size, args.peers)
    print(
        f"# tdabench.dev.bench gradients --model {args.model} --samples {args.samples} --length {args.length} "
        f"--batch-size {args.batch_size} --rounds {args.rounds} --threads {args.threads} --device {args.device}"
        + (" --peers" if args.peers else "")
    )
    print(f"# {machine()}; device {describe(where)}; load average {load()} at start")
    first = slice(0, min(args.batch_size, args.samples))
    checks = agreement(model, fns, ids[first], mask[first], labels[first])
    n_tensors = len(list(model.parameters()))
    seconds = interleave(contenders, args.rounds, warmup=1, sync=lambda: synchronize(where))
    per_s = rates(contenders, seconds)
    floor, loop = per_s["d_plain_fwd_bwd"], per_s["c_reference_loop"]
    print(f"# {args.rounds} rounds (one batch of every contender each, order rotating) after 1 warm-up round")
    print(f"# median [interquartile range] over rounds; ratios taken per round; load average {load()} at end")
    head = f"{'contender':<18} {'samples/s':>22} {'x plain (d)':>19} {'x loop (c)':>22}  tensors  rel. err vs bs=1"
    print(head)
    for c in contenders:
        tensors, err = checks.get(c.name, (None, None))
        check = f"{tensors}/{n_tensors}  {err:.1e}" if tensors is not None else c.note
        rate = per_s[c.name]
        print(f"{c.name:<18} {fmt(rate, 1):>22} {fmt(rate / floor, 3):>19} {fmt(rate / loop, 3):>22}  {check}")
    a = per_s["a_all"]
    print(
        f"# (a)/(d) = {fmt(a / floor)}   last-MLP/(a) = {fmt(per_s['b_last_mlp'] / a)}   (a)/(c) = {fmt(a / loop)}"
        f"   peak RSS of the process {peak_rss_mb():.0f} MB"
    )
    if "peer_bergson" in per_s:  # the same tensors on both sides
        print(f"# at Bergson's coverage: (b_linear)/bergson = {fmt(per_s['b_linear'] / per_s['peer_bergson'])}")
