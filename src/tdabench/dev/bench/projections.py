"""`bench projections`: our dense projections against TRAK's BasicProjector (when installed)."""

from __future__ import annotations

import torch

from tdabench.dev.bench.kit import Contender, fmt, interleave, load, machine, peak_rss_mb


def run(args) -> None:
    """Dense projections of [samples, dim] float32 rows to each k: ours (gaussian, rademacher,
    sjlt) against TRAK's BasicProjector (when `traker` is installed), interleaved."""
    import importlib.util

    from tdabench.projection import ProjectionConfig, project_component

    x = torch.randn(args.samples, args.dim, generator=torch.Generator().manual_seed(0))
    trak = importlib.util.find_spec("trak") is not None
    print(
        f"# tdabench.dev.bench projections --dim {args.dim} --samples {args.samples} --k {' '.join(map(str, args.k))} "
        f"--rounds {args.rounds} --trak-block-size {args.trak_block_size}"
    )
    print(f"# {machine()}; load average {load()} at start" + ("" if trak else "; TRAK not installed"))
    for k in args.k:
        contenders = [
            Contender(
                f"ours_{kind}",
                lambda r, kind=kind, k=k: project_component(x, 0, ProjectionConfig(kind, k, seed=0, nonzeros=1)),
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
