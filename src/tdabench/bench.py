"""Benchmarks that print numbers (never asserted in tests).

python -m tdabench.bench gradients [--model tiny|llama-135m|PATH] [--samples N] [--batch-size B] [--peers]
    samples/s, on the same batches, of
      (a) our extractor, all components
      (b) our extractor, a selection (the last layer's MLP; a greedy-selected set; the nn.Linear
          weights, which is what Bergson's hooks cover)
      (c) the reference-style loop: bs=1, loss.backward(), clone every .grad
      (d) a plain batched forward+backward (the floor no per-sample extractor can beat)
      peers (--peers): torch.func vmap(grad), Opacus GradSampleModule, Bergson's hooks (when installed)
    all in one process, interleaved batch by batch (tdabench.benchkit): medians and interquartile
    ranges over rounds, each ratio taken per round; agreement and coverage against the bs=1 loop.
python -m tdabench.bench store --model llama-135m --samples 64 --max-component-dim 65536 [--rounds R]
    write a gradient store with the dimension cap, interleaved round by round with the same
    extraction without the store: samples/s of both, peak RSS, file size against the estimate.
python -m tdabench.bench greedy [--components 113 --queries 988 --candidates 5] [--rounds 5]
    greedy forward selection run to the end on a random similarity store of the published size,
    the three objectives interleaved.
python -m tdabench.bench projections [--dim 1048576] [--k 4096 8192] [--samples 32] [--rounds 5]
    dense projections (ours: gaussian, rademacher, sjlt) against TRAK's BasicProjector (when the
    `traker` package is installed), interleaved; speed-up over TRAK per round.
python -m tdabench.bench similarity [--model llama-135m] [--lengths 64 256] [--candidates 5 10] [--rounds 2]
    the similarity store streamed from the model (tdabench.streaming): candidate layout (b
    candidates per query) and dense layout, seconds per query, against the reference-style loop
    (bs=1 loss.backward() per sample, clone every grad, a float64 dot per pair), against the same
    stream with every component materialised, and (dense, where the cache fits) against
    cache-then-similarity; interleaved round by round, each round on other queries.
python -m tdabench.bench numerics [--model tiny|llama-135m] [--samples N] [--length L] [--rounds R] [--study]
    numerics: portable against native (tdabench.numerics). Each mode needs its own process (the
    kernel pins are read when torch loads), so every round starts one worker per mode, order
    rotating; a worker times fine-tuning steps and gradient extraction on the same examples
    (lengths drawn up to L, batches padded as the mode pads them) after a warm-up. --study also
    times the whole default study from scratch (snakemake in a temporary copy) in each mode.
python -m tdabench.bench architectures [--jobs 2] [--output docs/architectures.md] [TYPE ...]
    every causal-LM architecture of transformers, built tiny: per-sample gradients vs the bs=1
    loop (tdabench.architectures); writes the markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tdabench.benchkit import Contender, PeakRss, fmt, interleave, load, machine, peak_rss_mb, rates

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    # SmolLM2-135M's shape (Llama architecture, tied embeddings), randomly initialised.
    "llama-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
}
GREEDY_SET = "results/selection/paraphrased.parquet"


def build(model_spec: str, samples: int, length: int, seed: int = 0):
    """(model, input_ids, attention_mask, labels) with response-style labels on the second half."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tdabench.config import validate_config
    from tdabench.models import TinyModelConfig

    torch.manual_seed(seed)
    if model_spec == "tiny":
        tiny = TinyModelConfig(**validate_config({})["model"]["tiny"])
        config = LlamaConfig(
            vocab_size=tiny.vocab_size,
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            tie_word_embeddings=False,
            attn_implementation="eager",  # as the study loads models (and vmap with padding needs it)
        )
        model = LlamaForCausalLM(config)
    elif model_spec in MODELS:
        model = LlamaForCausalLM(LlamaConfig(**MODELS[model_spec], attn_implementation="eager"))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_spec, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    lengths = torch.randint(length // 2, length + 1, (samples,), generator=gen)
    ids = torch.zeros(samples, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, :n] = 1
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
    return model, ids, mask, labels


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


def gradients_main(args) -> None:
    from tdabench.device import describe, resolve_device, synchronize

    where = resolve_device(args.device)
    model, ids, mask, labels = build(args.model, args.samples, args.length)
    model.to(where)
    ids, mask, labels = ids.to(where), mask.to(where), labels.to(where)
    contenders, fns = gradient_contenders(model, ids, mask, labels, args.batch_size, args.peers)
    print(
        f"# tdabench.bench gradients --model {args.model} --samples {args.samples} --length {args.length} "
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


def store_main(args) -> None:
    """Gradient store of a big model with the dimension cap, interleaved with the same extraction
    without the store: samples/s of both, the cost of writing, peak RSS, file size vs estimate."""
    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.gradients import iter_batches
    from tdabench.store import GradientStoreWriter, estimate_bytes

    model, ids, mask, labels = build(args.model, args.samples, args.length)
    cap = args.max_component_dim
    extraction = Extraction(model, ExtractionConfig(("all",), args.batch_size, cap, 0, None))
    comps, info = extraction.components, extraction.sketch_info
    stored = extraction.stored_dims
    estimate = estimate_bytes(args.samples, stored, args.dtype)
    batches = list(iter_batches(args.samples, args.batch_size))
    rounds = args.rounds or max(6, len(batches))
    if rounds < 2:
        raise SystemExit("bench store: --rounds must be >= 2 (one warm-up round, then timed ones)")
    buffers = extraction.buffers(args.batch_size)

    def extract(r):
        rows = batches[r % len(batches)]
        batch = {"input_ids": ids[rows], "attention_mask": mask[rows], "labels": labels[rows]}
        return rows, extraction(batch, out={n: b[: rows.stop - rows.start] for n, b in buffers.items()})

    print(
        f"# tdabench.bench store --model {args.model} --samples {args.samples} --length {args.length} "
        f"--batch-size {args.batch_size} --max-component-dim {cap} --dtype {args.dtype} --rounds {rounds}"
    )
    print(f"# {machine()}; load average {load()} at start")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.h5"
        with GradientStoreWriter(path, [f"s{i}" for i in range(args.samples)], comps, args.dtype, {}, info) as w:

            def extract_and_write(r):
                rows, grads = extract(r)
                w.write(rows, {n: v.numpy() for n, v in grads.items()})

            def units(r):
                return batches[r % len(batches)].stop - batches[r % len(batches)].start

            contenders = [
                Contender("extract", extract, units, "per-sample gradients, sketched, into reused buffers"),
                Contender("extract_and_write", extract_and_write, units, "the same, then written to the store"),
            ]
            seconds = interleave(contenders, rounds - 1, warmup=1)
            for r, rows in enumerate(batches):  # rows no round reached, so the store is complete
                if not w.done[rows].all():
                    extract_and_write(r)
            written = int(w.done.sum())
        size = path.stat().st_size  # (the writer renames its partial file into place only when complete)
    per_s = rates(contenders, seconds)
    params = sum(c.numel for c in comps)
    print(f"# {rounds - 1} rounds after 1 warm-up round; median [interquartile range]; load average {load()} at end")
    print(f"parameters {params:,} in {len(comps)} components, {len(info)} sketched to {cap:,} dims")
    print(f"stored dims per sample {sum(stored):,}; full gradient would be {params * 4 * args.samples / 1e9:.2f} GB")
    for c in contenders:
        print(f"{c.name:<18} {fmt(per_s[c.name]):>22} samples/s  {c.note}")
    ratio = fmt(seconds["extract_and_write"] / seconds["extract"])
    print(f"# extraction and writing take x{ratio} the extraction's time (per round)")
    print(
        f"store of {written}/{args.samples} rows: {size / 1e6:.1f} MB, estimate {estimate / 1e6:.1f} MB, "
        f"ratio {size / estimate:.3f}"
    )
    print(f"peak RSS of the process {peak_rss_mb() / 1024:.2f} GiB")


def _encoded(ids, mask, labels) -> list:
    """Rows of a padded batch as the study's encoded examples (padding dropped)."""
    from tdabench.models import Encoded

    out = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        lab = labels[i, keep].tolist()
        prefix = next((j for j, v in enumerate(lab) if v != -100), len(lab))
        out.append(Encoded(ids[i, keep].tolist(), lab, prefix, False))
    return out


def reference_similarity(model, names, queries, train, query_rows, candidates=None) -> dict:
    """What reference TDA scripts do: per sample a bs=1 loss.backward() with every parameter
    trainable, every .grad cloned, then float64 dots over the components `names`. Candidate
    layout: query by query, each of its candidates computed for it (no sharing); dense: the
    queries' gradients held, the training examples streamed once. -> {(q, t) | ("q"|"t", i): [C]}."""
    from tdabench.gradients import per_sample_loss

    params = dict(model.named_parameters())
    wanted = [list(params).index(n) for n in names]
    for p in params.values():
        p.requires_grad_(True)

    def grads(example):
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([example.input_ids])
        per_sample_loss(model(input_ids=ids).logits, torch.tensor([example.labels])).sum().backward()
        every = [p.grad.detach().clone() for p in params.values()]
        return [every[i].double().flatten() for i in wanted]

    def dots(a, b):
        return [torch.dot(x, y).item() for x, y in zip(a, b)]

    out = {}
    if candidates is not None:
        for q in query_rows:
            gq = grads(queries[q])
            out[("q", q)] = dots(gq, gq)
            for t in candidates[q]:
                gt = grads(train[t])
                out[(q, int(t))], out[("t", int(t))] = dots(gq, gt), dots(gt, gt)
        return out
    held = {q: grads(queries[q]) for q in query_rows}
    for q, gq in held.items():
        out[("q", q)] = dots(gq, gq)
    for t, example in enumerate(train):
        gt = grads(example)
        out[("t", t)] = dots(gt, gt)
        for q, gq in held.items():
            out[(q, t)] = dots(gq, gt)
    return out


def similarity_main(args) -> None:
    """Streamed similarity vs the reference loop, materialised-only and cache-then-similarity."""
    print(
        f"# tdabench.bench similarity --model {args.model} --lengths {' '.join(map(str, args.lengths))} "
        f"--candidates {' '.join(map(str, args.candidates))} --queries-per-round {args.queries_per_round} "
        f"--train {args.train} --dense-queries {args.dense_queries} --dense-train {args.dense_train} "
        f"--batch-size {args.batch_size} "
        f"--rounds {args.rounds} --memory-gb {args.memory_gb} --max-cache-gb {args.max_cache_gb}"
    )
    print(f"# {machine()}; load average {load()} at start")
    for length in args.lengths:
        _similarity_at(args, length)
    print(f"\npeak RSS of the process {peak_rss_mb() / 1024:.2f} GiB")


def _similarity_at(args, length: int) -> None:
    """One sample length: every candidate-layout b, then the dense layout."""
    import numpy as np

    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.factored import FACTORED, MATERIALISED
    from tdabench.similarity import build_similarity
    from tdabench.store import GradientStore, GradientStoreWriter, estimate_bytes
    from tdabench.streaming import Streamer, StreamSpec, header, plan_ways

    rounds, per = args.rounds, args.queries_per_round
    n_q = per * (rounds + 1)  # every round (and the warm-up) on other queries
    model, ids, mask, labels = build(args.model, n_q + args.train, length)
    everything = _encoded(ids, mask, labels)
    queries, train = everything[:n_q], everything[n_q:]
    extraction = Extraction(model, ExtractionConfig(tuple(args.components), args.batch_size, None, 0, None))
    rng = np.random.default_rng(0)
    gt = rng.integers(0, args.train, n_q)
    train_ids = [f"t{i}" for i in range(args.train)]
    tokens = float(np.mean([len(e.input_ids) for e in everything]))
    print(
        f"\n## {length} tokens (max; {tokens:.0f} on average), {len(extraction.names)} components, "
        f"{sum(c.numel for c in extraction.components):,} parameters"
    )

    def round_queries(r: int) -> np.ndarray:
        return np.arange(r * per, (r + 1) * per) % n_q

    with tempfile.TemporaryDirectory() as tmp:

        def stream(cand, rows, force=None, pool=train, truth=gt):
            layout = "dense" if cand is None else "candidates"
            ids = train_ids[: len(pool)]

            def run(r):
                qr = rows(r)
                streamer = Streamer(extraction, 0, StreamSpec(layout, args.memory_gb))
                if force is not None:
                    streamer._plan = lambda t, p: _forced(streamer, force)
                path = Path(tmp) / f"{layout}-{force}.h5"
                path.unlink(missing_ok=True)
                c = None if cand is None else cand[qr]
                return streamer.run(
                    [queries[i] for i in qr],
                    pool,
                    path,
                    lambda w: header(extraction, w, [f"q{i}" for i in qr], ids, truth[qr], c, {}),
                    c,
                )

            return run

        def reference(cand, rows, pool=train):
            def run(r):
                return reference_similarity(model, extraction.names, queries, pool, rows(r), cand)

            return run

        def units(r):
            return per

        def check(cand, pool, truth, rows):
            """The streamed store against the reference loop's dot products on `rows`."""
            from tdabench.similarity import load_similarity

            stream(cand, lambda r: rows, pool=pool, truth=truth)(0)
            layout = "dense" if cand is None else "candidates"
            sim = load_similarity(Path(tmp) / f"{layout}-None.h5")
            ref = reference_similarity(model, extraction.names, queries, pool, rows, cand)
            worst = 0.0
            for qi, q in enumerate(rows):
                cols = range(len(pool)) if cand is None else cand[q]
                for j, t in enumerate(cols):
                    scale = np.sqrt(np.array(ref[("q", q)]) * np.array(ref[("t", int(t))]))
                    got = sim.dot[:, qi, j if cand is not None else t]
                    worst = max(worst, float((np.abs(got - np.array(ref[(q, int(t))])) / scale).max()))
            print(f"# {layout}: streamed dot products vs the reference loop's, worst |diff| / (|a| |b|) = {worst:.1e}")

        for b in args.candidates:
            cand = np.stack([rng.choice(args.train, b, replace=False) for _ in range(n_q)])
            miss = ~(cand == gt[:, None]).any(1)
            cand[miss, -1] = gt[miss]
            if b == args.candidates[0]:
                check(cand, train, gt, np.arange(1))
            pps = (per * b + per * (1 + b)) / (per * (1 + b))  # pairs (and norms) per sample, no sharing
            ways = plan_ways(extraction, tokens, pps)
            n_f = sum(w == FACTORED for w in ways.values())
            contenders = [
                Contender("stream", stream(cand, round_queries), units, f"rule: {n_f} factored of {len(ways)}"),
                Contender("reference_loop", reference(cand, round_queries), units, "bs=1, clone grads, dot per pair"),
            ]
            if n_f:
                materialised = stream(cand, round_queries, MATERIALISED)
                contenders.insert(1, Contender("stream_materialised", materialised, units, "every one materialised"))
            _report(f"candidate layout, b = {b}, {per} queries a round", contenders, rounds, "reference_loop")

        def dense_rows(r):
            return np.arange(args.dense_queries)

        def dense_units(r):
            return args.dense_queries

        pool = train[: args.dense_train]
        truth = gt % len(pool)
        contenders = [
            Contender(
                "stream", stream(None, dense_rows, pool=pool, truth=truth), dense_units, f"memory_gb {args.memory_gb}"
            ),
            Contender(
                "reference_loop", reference(None, dense_rows, pool), dense_units, "bs=1, clone grads, dot per pair"
            ),
        ]
        check(None, pool, truth, np.arange(args.dense_queries))
        cache = estimate_bytes(args.dense_queries + len(pool), extraction.stored_dims, "float32")
        if cache <= args.max_cache_gb * 1e9:

            def cached(r):
                paths = {}
                for split, exs in (("train", pool), ("queries", queries[: args.dense_queries])):
                    paths[split] = Path(tmp) / f"{split}.h5"
                    names = [f"{split}{i}" for i in range(len(exs))]
                    meta = {"model_fingerprint": "m"}
                    with GradientStoreWriter(paths[split], names, extraction.components, "float32", meta) as w:
                        for rows, batch in extraction.batches(exs, 0):
                            w.write(rows, {n: g.numpy() for n, g in extraction(batch).items()})
                with GradientStore(paths["train"]) as t_, GradientStore(paths["queries"]) as q_:
                    sources = [f"train{i}" for i in truth[: args.dense_queries]]
                    build_similarity(t_, q_, q_.sample_ids, sources, Path(tmp) / "cached.h5", "s")

            note = f"gradient store of {cache / 1e9:.2f} GB, then build_similarity"
            contenders.append(Contender("cache_then_similarity", cached, dense_units, note))
        else:
            print(f"# dense: cache-then-similarity left out: its cache would take {cache / 1e9:.1f} GB")
        title = f"dense layout, {args.dense_queries} queries x {len(pool)} training examples"
        _report(title, contenders, rounds, "reference_loop")


def _forced(streamer, way):
    """The streamer's ways with `way` wherever it is possible (benchmark contenders)."""
    from tdabench.factored import MATERIALISED

    ex = streamer.extraction
    can = set(ex.factorable())
    ways = {n: (way if n in can else MATERIALISED) for n in ex.names}
    streamer.factored = [n for n, w in ways.items() if w != MATERIALISED]
    return ways


def _report(title, contenders, rounds, baseline) -> None:
    import numpy as np

    peaks: dict[str, float] = {}

    def watched(c: Contender) -> Contender:
        def run(r):
            with PeakRss() as rss:
                out = c.run(r)
            peaks[c.name] = max(peaks.get(c.name, 0.0), rss.peak_mb)
            return out

        return Contender(c.name, run, c.units, c.note)

    seconds = interleave([watched(c) for c in contenders], rounds, warmup=1)
    per_query = {c.name: seconds[c.name] / np.array([c.units(r) for r in range(rounds)]) for c in contenders}
    print(f"### {title}: {rounds} rounds after 1 warm-up; seconds per query, median [interquartile range]")
    print(f"{'contender':<22} {'s/query':>22}   {'x ' + baseline:>24}  peak RSS  note")
    for c in contenders:
        ratio = per_query[baseline] / per_query[c.name]
        print(
            f"{c.name:<22} {fmt(per_query[c.name], 2):>22}   {fmt(ratio, 2):>24}  "
            f"{peaks[c.name] / 1024:5.2f} GiB  {c.note}"
        )
    if "stream_materialised" in per_query:
        print(f"# factored (rule) vs materialised: x{fmt(per_query['stream_materialised'] / per_query['stream'], 2)}")


def greedy_main(args) -> None:
    """Greedy selection on a random candidate-layout similarity store of the published size."""
    import numpy as np

    from tdabench.selection import greedy_forward
    from tdabench.similarity import Similarity

    rng = np.random.default_rng(0)
    c, q, b, t = args.components, args.queries, args.candidates, args.queries * 2
    cands = np.stack([rng.choice(t, b, replace=False) for _ in range(q)])
    sim = Similarity(
        components=[f"c{i}" for i in range(c)],
        component_params=rng.integers(1000, 10**6, c),
        component_family=["other"] * c,
        component_layer=np.full(c, -1),
        query_ids=[f"q{i}" for i in range(q)],
        train_ids=[f"t{i}" for i in range(t)],
        ground_truth=cands[:, -1],
        query_sqnorm=rng.random((c, q)) + 0.5,
        train_sqnorm=rng.random((c, t)) + 0.5,
        dot=rng.standard_normal((c, q, b)),
        attrs={},
        candidates=cands,
    )
    contenders = [
        Contender(objective, lambda r, o=objective: greedy_forward(sim, np.arange(q), o), lambda r: q)
        for objective in ("top1", "mrr", "rho")
    ]
    seconds = interleave(contenders, args.rounds, warmup=1)
    print(f"# tdabench.bench greedy --components {c} --queries {q} --candidates {b} --rounds {args.rounds}")
    print(f"# {machine()}; load average {load()}; greedy run to the end ({c} steps)")
    for contender in contenders:
        print(f"greedy {contender.name:<4}: {fmt(seconds[contender.name], 3)} s (median [IQR] over rounds)")


def projections_main(args) -> None:
    """Dense projections of [samples, dim] float32 rows to each k: ours (gaussian, rademacher,
    sjlt) against TRAK's BasicProjector (when `traker` is installed), interleaved."""
    import importlib.util

    from tdabench.projection import ProjectionConfig, project_component

    x = torch.randn(args.samples, args.dim, generator=torch.Generator().manual_seed(0))
    trak = importlib.util.find_spec("trak") is not None
    print(
        f"# tdabench.bench projections --dim {args.dim} --samples {args.samples} --k {' '.join(map(str, args.k))} "
        f"--rounds {args.rounds} --trak-block-size {args.trak_block_size}"
    )
    print(f"# {machine()}; load average {load()} at start" + ("" if trak else "; TRAK not installed"))
    for k in args.k:
        contenders = [
            Contender(
                f"ours_{kind}",
                lambda r, kind=kind, k=k: project_component(x, 0, ProjectionConfig(kind, k)),
                lambda r: 1,
            )
            for kind in ("gaussian", "rademacher", "sjlt")
        ]
        if trak:
            from trak.projectors import BasicProjector, ProjectionType

            for kind in (ProjectionType.normal, ProjectionType.rademacher):
                proj = BasicProjector(args.dim, k, 0, kind, "cpu", block_size=args.trak_block_size)
                contenders.append(
                    Contender(f"trak_basic_{kind.value}", lambda r, p=proj: p.project(x, model_id=0), lambda r: 1)
                )
        seconds = interleave(contenders, args.rounds, warmup=1)
        base = seconds.get("trak_basic_normal")
        print(
            f"k = {k}: seconds per call, median [IQR]" + ("; speed-up = TRAK gaussian time / this time" if trak else "")
        )
        for c in contenders:
            speedup = f"   x{fmt(base / seconds[c.name])}" if base is not None else ""
            print(f"  {c.name:<24} {fmt(seconds[c.name], 3):>24}{speedup}")
    print(f"# load average {load()} at end; peak RSS {peak_rss_mb():.0f} MB")


def checks_main(args) -> None:
    """What the integrity checks of a finished default study cost, measured on its files: the
    read-back seal every HDF5 writer does, the checksum + finiteness pass of every job that reads
    a gradient store, the similarity and projection validation, against the jobs' own time."""
    import shutil

    import polars as pl
    import yaml

    from tdabench.config import validate_config
    from tdabench.integrity import RunningCheck, open_hdf5, seal_hdf5, verify_hdf5
    from tdabench.similarity import load_similarity, validate_similarity

    results = Path(args.results)
    cfg = validate_config(yaml.safe_load((results / "config.yaml").read_text()))
    settings, methods = cfg["dataset"]["settings"], cfg["projection"]["methods"]
    stp = "select_then_project" in methods
    readers = len(settings) + len([m for m in methods if m != "select_then_project"]) + (len(settings) if stp else 0)
    timings = {}

    def timed(name, fn, repeat=1):
        start = time.perf_counter()
        fn()
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * repeat

    h5 = sorted(p for p in results.rglob("*.h5") if not p.name.startswith("."))
    with tempfile.TemporaryDirectory() as tmp:
        for p in h5:  # what each writer adds before its rename
            copy = Path(tmp) / p.name
            shutil.copy2(p, copy)
            timed("seal (read back, finite, checksums, fsync) of every .h5", lambda c=copy: seal_hdf5(c))
    for p in sorted(results.glob("gradients/*/*.h5")):

        def one_pass(p=p):
            with open_hdf5(p) as f:
                for name in f["grads"]:
                    check = RunningCheck(p, f, f"grads/{name}")
                    check.feed(f["grads"][name][:])
                    check.finish()

        def read_only(p=p):
            with open_hdf5(p) as f:
                for name in f["grads"]:
                    f["grads"][name][:]

        start = time.perf_counter()
        read_only()
        plain = time.perf_counter() - start
        timed(f"checksum + finite pass of gradient stores, x{readers} reader jobs", one_pass, readers)
        timings[f"checksum + finite pass of gradient stores, x{readers} reader jobs"] -= plain * readers
    # Similarity stores and projection files are checked as they are read; timing a whole
    # verify_hdf5 pass (an extra read) for them is an upper bound of that cost.
    for p in sorted(results.glob("similarity/*.h5")):  # selection and evaluate load each
        sim = load_similarity(p)
        name = "similarity validation (checksums, shapes, ranges), x2 loads"
        timed(name, lambda p=p: verify_hdf5(p), 2)
        timed(name, lambda sim=sim, p=p: validate_similarity(sim, p), 2)
    for p in sorted(results.glob("projection/**/*.h5")):
        timed("projection file checksums (evaluate)", lambda p=p: verify_hdf5(p))
    jobs = sum(pl.read_csv(t, separator="\t")["s"].sum() for t in Path(args.benchmarks).rglob("*.tsv"))
    total = sum(timings.values())
    print(f"# tdabench.bench checks --results {results}   ({os.cpu_count()} CPUs)")
    for name, seconds in timings.items():
        print(f"{seconds:8.2f} s  {name}")
    print(f"{total:8.2f} s  all checks = {100 * total / jobs:.1f}% of the jobs' {jobs:.0f} s (benchmarks/*.tsv)")


def _check_one(model_type: str):
    import warnings

    from transformers.utils import logging as hf_logging

    from tdabench.dev.architectures import check_architecture

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    return check_architecture(model_type)


def architectures_main(args) -> None:
    """Check every architecture (one process per worker, fresh every few models) and write the table."""
    import multiprocessing

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    start = time.perf_counter()
    results = []
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=8) as pool:
        for r in pool.imap(_check_one, types):
            results.append(r)
            print(f"{r.model_type:<28} {r.status:<9} {r.seconds:5.1f} s  {r.reason[:100]}", flush=True)
    from tdabench.dev.architectures import render_markdown

    header = (
        f"transformers {transformers.__version__}, torch {torch.__version__}; "
        f"{len(types)} architectures checked in {time.perf_counter() - start:.0f} s with {args.jobs} workers."
    )
    text = render_markdown(results, header)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    if any(r.status in ("wrong", "error") for r in results):
        raise SystemExit("some architectures are wrong or crash the extractor (see the table)")


def numerics_worker(model_spec: str, samples: int, length: int, batch_size: int, threads: int) -> dict:
    """One worker of `bench numerics`, in a process whose mode was pinned before torch loaded:
    seconds of one pass of AdamW steps and of one extraction pass over the same examples."""
    from tdabench import numerics
    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.models import Encoded, collate
    from tdabench.train import lm_loss

    torch.set_num_threads(threads)
    numerics.configure_torch(numerics.mode())
    model, ids, mask, labels = build(model_spec, samples, length)
    examples = []
    for i in range(samples):
        n = int(mask[i].sum())
        examples.append(Encoded(ids[i, :n].tolist(), labels[i, :n].tolist(), n // 2, False))
    batches = [collate(examples[s : s + batch_size], 0) for s in range(0, samples, batch_size)]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    def train_pass():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            lm_loss(model, batch).backward()
            opt.step()
        model.eval()

    names = ["q", "k", "v", "o", "gate", "up", "down"] + (["lm_head"] if model_spec == "tiny" else [])
    extraction = Extraction(model, ExtractionConfig(tuple(names), batch_size, None, 0, None))

    def extract_pass():
        for batch in batches:
            extraction(batch)

    out = {"mode": numerics.mode(), "kernel_level": torch.backends.cpu.get_cpu_capability(), "tokens": tokens}
    for name, fn in (("train", train_pass), ("extract", extract_pass)):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - start
    return out


WORKER = (
    "import json, sys; from tdabench import numerics; numerics.pin_environment(sys.argv[1]); "
    "from tdabench.bench import numerics_worker; "
    "print(json.dumps(numerics_worker(sys.argv[2], *map(int, sys.argv[3:]))))"
)


def _run_worker(mode: str, args) -> dict:
    import json
    import subprocess
    import sys

    argv = [args.model, args.samples, args.length, args.batch_size, args.threads]
    result = subprocess.run(
        [sys.executable, "-c", WORKER, mode, *map(str, argv)], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(f"numerics worker ({mode}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _study_seconds(mode: str, cores: int) -> float:
    """Wall time of the whole default study from scratch in a temporary copy of this checkout."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    with tempfile.TemporaryDirectory(prefix=f"tdabench-{mode}-") as tmp:
        for name in ("Snakefile", "workflow", "config", "src", "envs"):
            source = root / name
            if source.is_dir():
                shutil.copytree(source, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(source, Path(tmp) / name)
        start = time.perf_counter()
        result = subprocess.run(
            [snakemake, "--cores", str(cores), "--config", f"numerics={mode}"], cwd=tmp, capture_output=True, text=True
        )
        if result.returncode:
            raise SystemExit(f"the study ({mode}) failed:\n{result.stderr[-3000:]}")
        return time.perf_counter() - start


def numerics_main(args) -> None:
    modes = ("native", "portable")
    print(
        f"# tdabench.bench numerics --model {args.model} --samples {args.samples} --length {args.length} "
        f"--batch-size {args.batch_size} --threads {args.threads} --rounds {args.rounds}"
        + (" --study" if args.study else "")
    )
    print(f"# {machine()}; load average {load()} at start")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes[r % 2 :] + modes[: r % 2]:
            runs[mode].append(_run_worker(mode, args))
    print(
        f"# {args.rounds} rounds, one fresh process per mode and round (order rotating); in each, one pass "
        "after a warm-up pass; median [interquartile range]"
    )
    for mode in modes:
        first = runs[mode][0]
        print(f"# {mode}: {first['kernel_level']} kernels, {first['tokens']} tokens a pass (padding included)")
    for what in ("train", "extract"):
        seconds = {m: np.array([run[what] for run in runs[m]]) for m in modes}
        ratio = seconds["portable"] / seconds["native"]
        print(
            f"{what:<8} native {fmt(seconds['native'])} s   portable {fmt(seconds['portable'])} s   "
            f"portable/native x{fmt(ratio)}"
        )
    if args.study:
        walls: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in modes[r % 2 :] + modes[: r % 2]:
                walls[mode].append(_study_seconds(mode, args.threads))
        ratio = np.array(walls["portable"]) / np.array(walls["native"])
        print(
            f"study    native {fmt(np.array(walls['native']), 0)} s   portable "
            f"{fmt(np.array(walls['portable']), 0)} s   portable/native x{fmt(ratio)}   "
            f"(default study from scratch, --cores {args.threads})"
        )
    print(f"# load average {load()} at end")


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (counts, sizes, rounds, threads)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tdabench.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("greedy")
    g.add_argument("--components", type=positive, default=113)
    g.add_argument("--queries", type=positive, default=988)
    g.add_argument("--candidates", type=positive, default=5)
    g.add_argument("--threads", type=positive, default=torch.get_num_threads())
    g.add_argument("--rounds", type=positive, default=5)
    pr = sub.add_parser("projections")
    pr.add_argument("--dim", type=positive, default=2**20, help="input dimension D")
    pr.add_argument("--samples", type=positive, default=32)
    pr.add_argument("--k", type=positive, nargs="+", default=[4096, 8192])
    pr.add_argument("--rounds", type=positive, default=5)
    pr.add_argument(
        "--trak-block-size", type=positive, default=100, help="TRAK BasicProjector's block_size (its default)"
    )
    pr.add_argument("--threads", type=positive, default=torch.get_num_threads())
    c = sub.add_parser("checks")
    c.add_argument("--results", default="results")
    c.add_argument("--benchmarks", default="benchmarks")
    c.add_argument("--threads", type=positive, default=torch.get_num_threads())
    sm = sub.add_parser("similarity")
    sm.add_argument("--model", default="llama-135m", help="tiny, llama-135m (SmolLM2-135M's shape) or a local path")
    sm.add_argument("--components", nargs="+", default=["q", "k", "v", "o", "gate", "up", "down"])
    sm.add_argument("--lengths", type=positive, nargs="+", default=[64, 256], help="tokens per sample (max)")
    sm.add_argument("--candidates", type=positive, nargs="+", default=[5, 10], help="b of the candidate layout")
    sm.add_argument("--queries-per-round", type=positive, default=2)
    sm.add_argument("--train", type=positive, default=24, help="training examples")
    sm.add_argument("--dense-queries", type=positive, default=2)
    sm.add_argument("--batch-size", type=positive, default=8)
    sm.add_argument("--rounds", type=positive, default=2, help="timed rounds after one warm-up round")
    sm.add_argument("--memory-gb", type=float, default=4.0, help="similarity.memory_gb of the dense layout")
    sm.add_argument("--dense-train", type=positive, default=8, help="training examples of the dense layout")
    sm.add_argument("--max-cache-gb", type=float, default=6.0, help="largest cache cache-then-similarity may write")
    sm.add_argument("--threads", type=positive, default=torch.get_num_threads())
    nm = sub.add_parser("numerics")
    nm.add_argument("--model", default="tiny", help="tiny (the default study's shape), llama-135m, or a local path")
    nm.add_argument("--samples", type=positive, default=128)
    nm.add_argument("--length", type=positive, default=40, help="tokens per sample (max)")
    nm.add_argument("--batch-size", type=positive, default=32)
    nm.add_argument("--rounds", type=positive, default=5)
    nm.add_argument("--study", action="store_true", help="also time the default study from scratch in each mode")
    nm.add_argument("--threads", type=positive, default=torch.get_num_threads())
    a = sub.add_parser("architectures")
    a.add_argument("types", nargs="*", help="model types (keys of the causal-LM mapping); default: all")
    a.add_argument("--jobs", type=positive, default=min(2, os.cpu_count() or 1), help="worker processes")
    a.add_argument("--output", default=None, help="write the markdown table here (e.g. docs/architectures.md)")
    a.add_argument("--threads", type=positive, default=1)
    for name in ("gradients", "store"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="tiny", help="tiny (the default study's shape), llama-135m, or a local path")
        p.add_argument("--samples", type=positive, default=256 if name != "store" else 64)
        p.add_argument("--length", type=positive, default=40 if name != "store" else 64, help="tokens per sample (max)")
        p.add_argument("--batch-size", type=positive, default=32 if name != "store" else 8)
        p.add_argument("--threads", type=positive, default=torch.get_num_threads())
        if name == "gradients":
            p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (config key device)")
            p.add_argument("--rounds", type=positive, default=20, help="timed rounds after one warm-up round")
            p.add_argument("--peers", action="store_true", help="add torch.func, Opacus (when installed)")
        if name == "store":
            p.add_argument("--rounds", type=positive, default=None, help="timed rounds + 1 warm-up (default: batches)")
            p.add_argument("--max-component-dim", type=positive, default=65536)
            p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "gradients":
        gradients_main(args)
    elif args.command == "projections":
        projections_main(args)
    elif args.command == "greedy":
        greedy_main(args)
    elif args.command == "architectures":
        architectures_main(args)
    elif args.command == "similarity":
        similarity_main(args)
    elif args.command == "checks":
        checks_main(args)
    elif args.command == "numerics":
        numerics_main(args)
    else:
        store_main(args)


if __name__ == "__main__":
    main()
