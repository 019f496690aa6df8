"""`bench greedy`: greedy forward selection to the end on a random store of the published size."""

from __future__ import annotations

from tdabench.dev.bench.kit import Contender, fmt, interleave, load, machine


def run(args) -> None:
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
    print(f"# tdabench.dev.bench greedy --components {c} --queries {q} --candidates {b} --rounds {args.rounds}")
    print(f"# {machine()}; load average {load()}; greedy run to the end ({c} steps)")
    for contender in contenders:
        print(f"greedy {contender.name:<4}: {fmt(seconds[contender.name], 3)} s (median [IQR] over rounds)")
