"""`bench store`: writing a capped gradient store against the same extraction without it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tdabench.dev.bench.kit import Contender, fmt, interleave, load, machine, peak_rss_mb, rates
from tdabench.dev.bench.workload import build


def run(args) -> None:
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
        f"# tdabench.dev.bench store --model {args.model} --samples {args.samples} --length {args.length} "
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
