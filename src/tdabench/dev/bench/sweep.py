"""`bench sweep`: one group of the streamed projection job (`projection_stream`), component by
component: every configured projection of each component's formed gradients, one projection at
a time (`project_component`), in one sweep with each block on its own (FUSED_COLUMNS = 1), and
in one sweep with narrow blocks sharing products (`project_many` as the job runs it)."""

from __future__ import annotations

import torch

from tdabench.dev.bench.kit import Contender, fmt, interleave, load, machine, peak_rss_mb


def layer_dims(hidden: int, kv: int, intermediate: int) -> list[int]:
    """A Llama layer's q, k, v, o, gate, up, down weights: d_out x d_in each."""
    return [hidden * hidden, kv * hidden, kv * hidden, hidden * hidden] + [intermediate * hidden] * 3


def run(args) -> None:
    """Seconds per group of `samples` rows for one layer's components (of a model of `layers`
    such layers, which sets the block-wise sizes), each contender interleaved round by round."""
    import tdabench.projection as P

    one = layer_dims(args.hidden, args.kv, args.intermediate)
    dims = one * args.layers
    layer = range(len(one))  # the first layer's components (block sizes as in any layer)
    projectors = [
        P.Projector(P.method_config(m, k, s), dims) for m in args.methods for k in args.k for s in range(args.seeds)
    ]
    blocks = {c: [p.block(c) for p in projectors] for c in layer}
    gen = torch.Generator().manual_seed(0)
    xs = {c: torch.randn(args.samples, dims[c], generator=gen) for c in layer}  # [group, d_c] formed
    print(
        f"# tdabench.dev.bench sweep --samples {args.samples} --layers {args.layers} --hidden {args.hidden} "
        f"--kv {args.kv} --intermediate {args.intermediate} "
        f"--methods {' '.join(args.methods)} --k {' '.join(map(str, args.k))} "
        f"--seeds {args.seeds} --rounds {args.rounds}"
    )
    print(f"# {machine()}; load average {load()} at start")

    def one_at_a_time(r):
        return {c: [P.project_component(xs[c], b.index, b.cfg, k=b.k) for b in blocks[c]] for c in layer}

    def sweep(r, fused=True):
        saved = P.FUSED_COLUMNS
        P.FUSED_COLUMNS = saved if fused else 1  # 1: every block on its own, drawn in this thread
        try:
            return {c: P.project_many(xs[c], blocks[c])[0] for c in layer}
        finally:
            P.FUSED_COLUMNS = saved

    want, got = one_at_a_time(0), sweep(0)
    worst = max(float((g - w).abs().max() / w.abs().max()) for c in layer for g, w in zip(got[c], want[c]))
    print(
        f"# one sweep vs one at a time: worst |diff| / max |value| = {worst:.1e} (float32 rounding of shared products)"
    )
    contenders = [
        Contender("one_at_a_time", one_at_a_time, lambda r: args.samples),
        Contender("sweep_unshared", lambda r: sweep(r, fused=False), lambda r: args.samples),
        Contender("sweep", sweep, lambda r: args.samples),
    ]
    seconds = interleave(contenders, args.rounds, warmup=1)
    base = seconds["one_at_a_time"]
    print(
        f"## {len(projectors)} projections of one layer's {len(layer)} components, {args.samples} rows: "
        "seconds a group, median [IQR]"
    )
    for c in contenders:
        print(f"  {c.name:<16} {fmt(seconds[c.name], 3):>24}   x{fmt(base / seconds[c.name])} the one-at-a-time speed")
    ratio = seconds["sweep_unshared"] / seconds["sweep"]
    print(f"# sweep vs sweep_unshared: x{fmt(ratio)}; load average {load()} at end; peak RSS {peak_rss_mb():.0f} MB")
