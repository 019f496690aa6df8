"""`bench similarity`: the similarity store streamed from the model (both layouts) against the
reference loop, the same stream with every component materialised, and cache-then-similarity."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tdabench.dev.bench.kit import Contender, PeakRss, fmt, interleave, load, machine, peak_rss_mb
from tdabench.dev.bench.workload import build, encoded, random_batch


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


def dattri_similarity(model, names, queries, train, query_rows, candidates=None, batch_size: int = 8) -> dict:
    """The same dot products by dattri-llm 0.1 (`pip install --no-deps dattri-llm`; skipped when
    absent): its HookManager captures each linear layer's inputs and output gradients (factorised,
    `invasive_linear_io`: no weight gradient formed) from batched backwards of the same loss (the
    sum of per-sample mean cross-entropies), and its ops score them in float64: every pair with
    `Gradient.similarity(mode="auto")` (its FLOP rule picks factorised or materialised per layer),
    the candidate layout's pairs with `ops.dot` on gathered rows (it has no candidate op; each
    distinct candidate is captured once). -> {(q, t) | ("q"|"t", i): [C]} as reference_similarity."""
    import re

    import numpy as np
    from dattri_llm import HookManager, HookManagerConfig
    from dattri_llm.gradient import ops

    from tdabench.gradients import per_sample_loss
    from tdabench.models import collate

    modules = [n.removesuffix(".weight") for n in names]
    select = ["^" + re.escape(m) + "$" for m in modules]

    def capture(examples):
        hm = HookManager(model, config=HookManagerConfig(invasive_linear_io=select))
        blocks = []
        with hm.collect(deregister_on_exit=True):
            for s in range(0, len(examples), batch_size):
                batch = collate(list(examples[s : s + batch_size]), 0)
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_sample_loss(logits, batch["labels"]).sum().backward()
                blocks.append(hm.get_gradient())  # read before the next forward
        model.zero_grad(set_to_none=True)
        grads = blocks[0]
        for b in blocks[1:]:
            grads = grads.concatenate(b, dim="batch")
        return grads

    def self_dots(g):  # [C, n]
        return np.stack([ops.dot(g.data[m], g.data[m], g.layer_types[m]).double().numpy() for m in modules])

    rows = [int(q) for q in query_rows]
    columns = sorted({int(t) for q in rows for t in candidates[q]}) if candidates is not None else range(len(train))
    columns = list(columns)
    out = {}
    with ops.compute_dtype(torch.float64):
        gq, gt = capture([queries[q] for q in rows]), capture([train[t] for t in columns])
        for sq, q in zip(self_dots(gq).T, rows):
            out[("q", q)] = list(sq)
        for st, t in zip(self_dots(gt).T, columns):
            out[("t", t)] = list(st)
        if candidates is None:
            dots = gq.similarity(gt, metric="dot", reduce="none", mode="auto")  # {module: [Q, T]}
            for i, q in enumerate(rows):
                for j, t in enumerate(columns):
                    out[(q, t)] = [float(dots[m][i, j]) for m in modules]
        else:
            at = {t: j for j, t in enumerate(columns)}
            # one query's pairs at a time: a slice copies its rows' factors, and all of the paper
            # overlap's 300 pairs at once would copy about 48 GB at 256 tokens
            for i, q in enumerate(rows):
                ts = [int(t) for t in candidates[q]]
                sq = gq.slice("batch", torch.full((len(ts),), i))
                st = gt.slice("batch", torch.tensor([at[t] for t in ts]))
                pair = np.stack([ops.dot(sq.data[m], st.data[m], sq.layer_types[m]).double().numpy() for m in modules])
                for p, t in enumerate(ts):
                    out[(q, t)] = list(pair[:, p])
    return out


def worst_between(got: dict, ref: dict) -> float:
    """Largest |got - ref| / (|a| |b|) over the reference's pairs (norms from the reference)."""
    import numpy as np

    worst = 0.0
    for key, want in ref.items():
        if key[0] in ("q", "t"):
            continue
        q, t = key
        scale = np.sqrt(np.array(ref[("q", q)]) * np.array(ref[("t", t)]))
        worst = max(worst, float((np.abs(np.array(got[key]) - np.array(want)) / scale).max()))
    return worst


def worst_disagreement(sim, ref: dict, rows, candidates, n_train: int) -> float:
    """Largest |store dot - reference dot| / (|a| |b|) over the reference's queries `rows` (store
    row i holds query rows[i]) and their columns (every training example, or the candidates)."""
    import numpy as np

    worst = 0.0
    for qi, q in enumerate(rows):
        cols = range(n_train) if candidates is None else candidates[q]
        for j, t in enumerate(cols):
            scale = np.sqrt(np.array(ref[("q", q)]) * np.array(ref[("t", int(t))]))
            got = sim.dot[:, qi, j if candidates is not None else t]
            worst = max(worst, float((np.abs(got - np.array(ref[(q, int(t))])) / scale).max()))
    return worst


def overlap_workload(vocab: int, n_train: int, n_queries: int, length: int, b: int, topics: int, seed: int = 0):
    """The paper's candidate overlap at reduced size -> (train, queries, candidates [Q, b], sources [Q]).

    Training examples draw their prompts from one of `topics` small vocabularies (as facts about
    one entity share words); a query paraphrases a random source's prompt (a third of its tokens
    redrawn from the topic) and keeps its response. BM25 (lucene) over the prompts picks each
    query's top b training examples, the source forced in (the published rule), so the sets of
    queries on one topic overlap and each training example sits in about Q·b/N sets."""
    import numpy as np

    from tdabench.data.bm25 import bm25_scores, top_candidates
    from tdabench.models import Encoded
    from tdabench.sections import BM25Config

    rng = np.random.default_rng(seed)
    per_topic = min(64, (vocab - 1) // topics)
    words = rng.choice(np.arange(1, vocab), (topics, per_topic), replace=False)  # [topics, words] disjoint

    def example(topic: int, n: int):
        prompt = rng.choice(words[topic], n // 2).tolist()
        return prompt, rng.integers(1, vocab, n - n // 2).tolist()

    topic_of = rng.integers(0, topics, n_train)
    train_parts = [example(int(t), int(rng.integers(length // 2, length + 1))) for t in topic_of]
    sources = rng.integers(0, n_train, n_queries)
    query_parts = []
    for s in sources:
        prompt, response = train_parts[s]
        prompt = list(prompt)
        for i in rng.choice(len(prompt), len(prompt) // 3, replace=False):
            prompt[i] = int(rng.choice(words[topic_of[s]]))
        query_parts.append((prompt, response))

    def encode(prompt, response):
        return Encoded(prompt + response, [-100] * len(prompt) + response, len(prompt), False)

    def text(prompt):
        return " ".join(map(str, prompt))

    cfg = BM25Config("lucene", "whitespace", "prompt")
    scores = bm25_scores([text(p) for p, _ in query_parts], [text(p) for p, _ in train_parts], cfg)
    candidates = top_candidates(scores, sources, b)
    train = [encode(*parts) for parts in train_parts]
    queries = [encode(*parts) for parts in query_parts]
    return train, queries, candidates, sources


def run(args) -> None:
    """Streamed similarity vs the reference loop, materialised-only and cache-then-similarity."""
    print(
        f"# tdabench.dev.bench similarity --model {args.model} --lengths {' '.join(map(str, args.lengths))} "
        f"--candidates {' '.join(map(str, args.candidates))} --queries-per-round {args.queries_per_round} "
        f"--train {args.train} --dense-queries {args.dense_queries} --dense-train {args.dense_train} "
        f"--batch-size {args.batch_size} --overlap-queries {args.overlap_queries} --overlap-train "
        f"{args.overlap_train} --overlap-b {args.overlap_b} --overlap-topics {args.overlap_topics} "
        f"--rounds {args.rounds} --memory-gb {args.memory_gb} --max-cache-gb {args.max_cache_gb} "
        f"--cases {' '.join(args.cases)}"
        + (
            f" --shared-train {args.shared_train} --shared-queries {args.shared_queries} --projection-methods "
            f"{' '.join(args.projection_methods)} --projection-dims {' '.join(map(str, args.projection_dims))} "
            f"--projection-seeds {' '.join(map(str, args.projection_seeds))}"
            if "shared" in args.cases
            else ""
        )
    )
    print(f"# {machine()}; load average {load()} at start")
    for length in args.lengths:
        _similarity_at(args, length)
    print(f"\npeak RSS of the process {peak_rss_mb() / 1024:.2f} GiB")


def _similarity_at(args, length: int) -> None:
    """One sample length: every candidate-layout b, then the dense layout."""
    import numpy as np

    from tdabench.cached import build_similarity
    from tdabench.extraction import Extraction, ExtractionConfig
    from tdabench.factored import FACTORED, MATERIALISED
    from tdabench.store import GradientStore, GradientStoreWriter, estimate_bytes
    from tdabench.streaming import Sink, Streamer, StreamSpec, header, plan_ways

    rounds, per = args.rounds, args.queries_per_round
    n_q = per * (rounds + 1)  # every round (and the warm-up) on other queries
    model, ids, mask, labels = build(args.model, n_q + args.train, length)
    everything = encoded(ids, mask, labels)
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
                sink = Sink(
                    path,
                    lambda w: header(extraction, w, [f"q{i}" for i in qr], ids, truth[qr], c, {}),
                    np.arange(len(qr)),
                    c,
                )
                return streamer.run([queries[i] for i in qr], pool, [sink])

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
            worst = worst_disagreement(sim, ref, rows, cand, len(pool))
            print(f"# {layout}: streamed dot products vs the reference loop's, worst |diff| / (|a| |b|) = {worst:.1e}")

        for b in args.candidates if "candidates" in args.cases else []:
            cand = np.stack([rng.choice(args.train, b, replace=False) for _ in range(n_q)])
            miss = ~(cand == gt[:, None]).any(1)
            cand[miss, -1] = gt[miss]
            if b == args.candidates[0]:
                check(cand, train, gt, np.arange(1))
            pps = (per * b + per * (1 + b)) / (per * (1 + b))  # pairs (and norms) per sample, no sharing
            ways = plan_ways(extraction, tokens, pps)
            n_f = sum(w == FACTORED for w in ways.values())

            def floor(r, cand=cand):
                qr = round_queries(r)
                fwd_bwd(model, extraction, [[queries[i] for i in qr], [train[t] for t in np.unique(cand[qr])]])

            contenders = [
                Contender("stream", stream(cand, round_queries), units, f"rule: {n_f} factored of {len(ways)}"),
                Contender("reference_loop", reference(cand, round_queries), units, "bs=1, clone grads, dot per pair"),
                Contender("fwd_bwd", floor, units, FLOOR_NOTE + " of the distinct samples (no dot products)"),
            ]
            if n_f:
                materialised = stream(cand, round_queries, MATERIALISED)
                contenders.insert(1, Contender("stream_materialised", materialised, units, "every one materialised"))
            peer = _dattri(model, extraction.names, queries, train, cand, round_queries, units, np.arange(1))
            contenders += [peer] if peer else []
            _report(f"candidate layout, b = {b}, {per} queries a round", contenders, rounds, "reference_loop")

        if "dense" in args.cases:

            def dense_rows(r):
                return np.arange(args.dense_queries)

            def dense_units(r):
                return args.dense_queries

            pool = train[: args.dense_train]
            truth = gt % len(pool)
            contenders = [
                Contender(
                    "stream",
                    stream(None, dense_rows, pool=pool, truth=truth),
                    dense_units,
                    f"memory_gb {args.memory_gb}",
                ),
                Contender(
                    "reference_loop", reference(None, dense_rows, pool), dense_units, "bs=1, clone grads, dot per pair"
                ),
                Contender(
                    "fwd_bwd",
                    lambda r: fwd_bwd(model, extraction, [queries[: args.dense_queries], pool]),
                    dense_units,
                    FLOOR_NOTE + " (no dot products)",
                ),
                Contender(
                    "fwd_bwd_activations",
                    lambda r: fwd_bwd(model, extraction, [queries[: args.dense_queries], pool], weights=False),
                    dense_units,
                    "the same with no weight gradient: no stream is faster",
                ),
            ]
            check(None, pool, truth, np.arange(args.dense_queries))
            peer = _dattri(
                model, extraction.names, queries, pool, None, dense_rows, dense_units, np.arange(args.dense_queries)
            )
            contenders += [peer] if peer else []
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
        if args.overlap_queries and "overlap" in args.cases:
            _overlap(args, length, model, extraction, Path(tmp))
        if "shared" in args.cases:
            _shared(args, length, model, extraction, Path(tmp))


def _overlap(args, length: int, model, extraction, tmp: Path) -> None:
    """The candidate layout with the paper's overlap: one stream over every query (in units as
    memory_gb holds them, each distinct candidate once per unit) against the reference loop, which
    recomputes each query's candidates for it."""
    import numpy as np

    from tdabench.similarity import load_similarity
    from tdabench.streaming import Sink, Streamer, StreamSpec, group_queries, header

    b, topics = args.overlap_b, args.overlap_topics
    train, queries, cand, sources = overlap_workload(
        model.config.vocab_size, args.overlap_train, args.overlap_queries, length, b, topics
    )
    n_q, rows = len(queries), np.arange(len(queries))
    sets = np.bincount(cand.ravel(), minlength=len(train))
    distinct = int((sets > 0).sum())
    print(
        f"\n### candidate layout with the paper's overlap: {n_q} queries over {len(train)} training examples, "
        f"b = {b}, BM25 over prompts from {topics} topics: {distinct} distinct candidates, each in "
        f"{sets[sets > 0].mean():.1f} sets on average (the paper: about 5)"
    )
    path, ids, done = tmp / "overlap.h5", [f"t{i}" for i in range(len(train))], {}

    def stream(r):
        path.unlink(missing_ok=True)
        streamer = Streamer(extraction, 0, StreamSpec("candidates", args.memory_gb))
        make = lambda w: header(extraction, w, [f"q{i}" for i in rows], ids, sources, cand, {})  # noqa: E731
        report = streamer.run(queries, train, [Sink(path, make, rows, cand)])
        done.update(units=report.n_units, samples=report.samples_computed)

    def reference(r):
        return reference_similarity(model, extraction.names, queries, train, rows, cand)

    stream(0)
    check = rows[:2]
    ref = reference_similarity(model, extraction.names, queries, train, check, cand)
    worst = worst_disagreement(load_similarity(path), ref, check, cand, len(train))
    print(f"# streamed dot products vs the reference loop's (queries 0, 1), worst |diff| / (|a| |b|) = {worst:.1e}")
    print(
        f"# samples through the model: stream {done['samples']} in {done['units']} unit(s) at memory_gb "
        f"{args.memory_gb}; reference loop {n_q * (1 + b)}; the floor (each distinct sample once) {n_q + distinct}"
    )
    distinct_train = [train[t] for t in np.unique(cand)]
    contenders = [
        Contender("stream", stream, lambda r: n_q, f"memory_gb {args.memory_gb}"),
        Contender("reference_loop", reference, lambda r: n_q, "bs=1, each query's candidates recomputed"),
        Contender(
            "fwd_bwd",
            lambda r: fwd_bwd(model, extraction, [queries, distinct_train]),
            lambda r: n_q,
            FLOOR_NOTE + " of the distinct samples (no dot products)",
        ),
    ]
    # dattri-llm in as many units as the stream, grouped as the stream groups them: each distinct
    # candidate captured once per unit (all 60 queries' factors at once would not fit in 24 GB)
    units = group_queries(cand, np.ones(cand.shape, dtype=bool), -(-n_q // done["units"]))
    peer = _dattri(model, extraction.names, queries, train, cand, lambda r: rows, lambda r: n_q, check, units)
    contenders += [peer] if peer else []
    _report(f"paper overlap, {n_q} queries a round", contenders, args.rounds, "reference_loop", warmup=0)


FLOOR_NOTE = "the floor: plain batched forward + backward"


def fwd_bwd(model, extraction, parts, weights: bool = True) -> None:
    """A plain batched forward and backward of every sample of `parts`, in the extraction's
    batches: the weight gradients of its components only (no per-sample gradient, nothing
    kept), the head's unread logits skipped as the extraction skips them. The floor of any
    streamed pass over these samples. weights=False: no weight gradient at all, only the
    activations' gradients down to the input embeddings, which every per-sample method needs
    (a factored one takes its layers' output gradients from them)."""
    from tdabench.gradients import first_predicting, per_sample_loss

    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(weights and n in extraction.names)
    hook = None
    if not weights:  # the backward starts from the embeddings' output, a leaf
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        for part in parts:
            for _, batch in extraction.batches(part, 0):
                model.zero_grad(set_to_none=True)
                first = first_predicting(batch["labels"])
                keep = {"logits_to_keep": batch["labels"].shape[1] - first} if first else {}
                ids, mask = batch["input_ids"], batch["attention_mask"]
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **keep).logits
                per_sample_loss(logits, batch["labels"]).sum().backward()
    finally:
        if hook is not None:
            hook.remove()
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(saved[n])


def _shared(args, length: int, model, extraction, tmp: Path) -> None:
    """Similarity plus projections as the study's shared job computes them (every setting's
    store and every projection from one streamed pass: tdabench.pipeline.shared_stream), the
    same pass without projections, and the floor the real-model targets are set against: one
    plain batched forward and backward of each distinct sample (weight gradients of the same
    components, the head's unread logits skipped as the pass skips them) plus the stores' dot
    products as one float64 matrix product per component ([train, d_c] x [d_c, queries])."""
    import numpy as np

    from tdabench.producer import Target
    from tdabench.projection import method_config
    from tdabench.projection_stream import InPass, Plan, Projections, project_from_model
    from tdabench.streaming import StreamProducer, StreamSpec

    n_train, n_q = args.shared_train, args.shared_queries
    if n_q < 2:
        raise SystemExit(f"bench similarity: --shared-queries must be >= 2 (two settings' queries), not {n_q}")
    examples = encoded(*random_batch(model.config.vocab_size, n_train + n_q, length, seed=1))
    train, queries = examples[:n_train], examples[n_train:]
    names, dims = list(extraction.names), dict(zip(extraction.names, extraction.stored_dims))
    keys = [(m, k, s) for m in args.projection_methods for k in args.projection_dims for s in args.projection_seeds]
    plans = [Plan(method_config(m, k, s), tuple(names)) for m, k, s in keys]
    train_ids, query_ids = [f"t{i}" for i in range(n_train)], [f"q{i}" for i in range(n_q)]
    truth = np.random.default_rng(1).integers(0, n_train, n_q)
    settings = np.array_split(np.arange(n_q), 2)  # two settings' queries, as the study's
    targets = [
        Target([query_ids[i] for i in rows], train_ids, truth[rows], attrs={"setting": f"s{j}"})
        for j, rows in enumerate(settings)
    ]
    outs = [tmp / f"shared-s{j}.h5" for j in range(len(targets))]
    tokens = np.mean([len(e.input_ids) for e in examples])
    print(
        f"\n### similarity plus projections in one pass: {n_q} queries (2 settings) x {n_train} training "
        f"examples, {tokens:.0f} tokens on average; projections {', '.join(args.projection_methods)} at k = "
        f"{', '.join(map(str, args.projection_dims))}, seeds {', '.join(map(str, args.projection_seeds))} "
        f"({len(plans)} in all)"
    )
    seen: dict[str, list] = {"tapped": [], "passes": []}

    def stream(with_projections: bool):
        def run(r):
            for out in outs:
                out.unlink(missing_ok=True)
            spec = StreamSpec("dense", args.memory_gb)
            producer = StreamProducer(extraction, 0, spec, queries, train, query_ids)
            tap = None
            if with_projections:
                projections = Projections(plans, names, dims, n_train + n_q)
                tap = InPass(projections, extraction, n_train, n_q)
            report = producer.write_all(outs, targets, None, tap)
            seen["passes"].append((report.n_units, report.spill_gb))
            if tap is None:
                return
            seen["tapped"].append(tap.complete)
            if not tap.complete:  # as the job does: the projections in a pass of their own
                project_from_model(extraction, 0, [train, queries], plans, args.memory_gb)

        return run

    widest = max(dims.values())
    gen = torch.Generator().manual_seed(2)
    formed = [torch.randn(n, widest, generator=gen) for n in (n_train, n_q)]  # stand-ins, [n, widest]

    def products(r):
        for d in dims.values():
            t, q = (f[:, :d].double() for f in formed)
            torch.mm(t, q.T)  # [train, queries]

    units = lambda r: n_train + n_q  # noqa: E731
    contenders = [
        Contender("shared_pass", stream(True), units, f"stores + {len(plans)} projections, memory_gb {args.memory_gb}"),
        Contender("similarity_only", stream(False), units, "the same pass, no projections"),
        Contender("fwd_bwd", lambda r: fwd_bwd(model, extraction, [train, queries]), units, FLOOR_NOTE),
        Contender("float64_products", products, units, "one float64 [train, d_c] x [d_c, queries] per component"),
    ]
    peaks: dict[str, float] = {}

    def watched(c: Contender) -> Contender:
        def run(r):
            with PeakRss() as rss:
                c.run(r)
            peaks[c.name] = max(peaks.get(c.name, 0.0), rss.peak_mb)

        return Contender(c.name, run, c.units, c.note)

    seconds = interleave([watched(c) for c in contenders], args.rounds, warmup=0)
    floor = seconds["fwd_bwd"] + seconds["float64_products"]
    tapped = bool(seen["tapped"]) and all(seen["tapped"])
    print(f"### {args.rounds} rounds, no warm-up; seconds per round (all samples), median [interquartile range]")
    print(f"{'contender':<22} {'seconds':>24}   {'x the floor':>20}  peak RSS  note")
    for c in contenders:
        print(
            f"{c.name:<22} {fmt(seconds[c.name], 1):>24}   {fmt(seconds[c.name] / floor, 2):>20}  "
            f"{peaks[c.name] / 1024:5.2f} GiB  {c.note}"
        )
    print(
        f"# the floor (fwd_bwd + float64_products): {fmt(floor, 1)} s; shared_pass x fwd_bwd alone: "
        f"{fmt(seconds['shared_pass'] / seconds['fwd_bwd'], 2)}; the projections' time (shared_pass - "
        f"similarity_only): {fmt(seconds['shared_pass'] - seconds['similarity_only'], 1)} s; taken in the "
        f"similarity pass: {tapped} "
        "(if not: in a pass of their own, as the job takes them)"
    )
    chunks, spilled = seen["passes"][-1]
    print(f"# each pass: {chunks} unit(s) of queries, {spilled:.1f} GB of training examples kept on disk")


def _dattri(model, names, queries, pool, cand, rows, units, check_rows, groups=None):
    """dattri-llm as a contender on the same work, after its dot products are checked against the
    reference loop's on `check_rows`; None (said so) when it is not installed. groups: the
    queries' positions among rows(r) in groups scored one call each (as the stream's units)."""
    import importlib.util

    if importlib.util.find_spec("dattri_llm") is None:
        print("# dattri_llm: not installed (pip install --no-deps dattri-llm); left out")
        return None
    ref = reference_similarity(model, names, queries, pool, check_rows, cand)
    got = dattri_similarity(model, names, queries, pool, check_rows, cand)
    worst = worst_between(got, ref)
    print(f"# dattri_llm: its dot products vs the reference loop's, worst |diff| / (|a| |b|) = {worst:.1e}")

    def run(r):
        if groups is None:
            return dattri_similarity(model, names, queries, pool, rows(r), cand)
        out = {}
        for group in groups:
            out.update(dattri_similarity(model, names, queries, pool, rows(r)[group], cand))
        return out

    note = "HookManager invasive_linear_io, ops in float64, auto"
    return Contender("dattri_llm", run, units, note + (f", {len(groups)} units" if groups else ""))


def _forced(streamer, way):
    """The streamer's ways with `way` wherever it is possible (benchmark contenders)."""
    from tdabench.factored import MATERIALISED

    ex = streamer.extraction
    can = set(ex.factorable())
    ways = {n: (way if n in can else MATERIALISED) for n in ex.names}
    streamer.factored = [n for n, w in ways.items() if w != MATERIALISED]
    return ways


def _report(title, contenders, rounds, baseline, warmup: int = 1) -> None:
    import numpy as np

    peaks: dict[str, float] = {}

    def watched(c: Contender) -> Contender:
        def run(r):
            with PeakRss() as rss:
                out = c.run(r)
            peaks[c.name] = max(peaks.get(c.name, 0.0), rss.peak_mb)
            return out

        return Contender(c.name, run, c.units, c.note)

    seconds = interleave([watched(c) for c in contenders], rounds, warmup=warmup)
    per_query = {c.name: seconds[c.name] / np.array([c.units(r) for r in range(rounds)]) for c in contenders}
    after = f"after {warmup} warm-up" if warmup else "(both ran once before: the agreement check)"
    print(f"### {title}: {rounds} rounds {after}; seconds per query, median [interquartile range]")
    print(f"{'contender':<22} {'s/query':>22}   {'x ' + baseline:>24}  peak RSS  note")
    for c in contenders:
        ratio = per_query[baseline] / per_query[c.name]
        print(
            f"{c.name:<22} {fmt(per_query[c.name], 2):>22}   {fmt(ratio, 2):>24}  "
            f"{peaks[c.name] / 1024:5.2f} GiB  {c.note}"
        )
    if "stream_materialised" in per_query:
        print(f"# factored (rule) vs materialised: x{fmt(per_query['stream_materialised'] / per_query['stream'], 2)}")
