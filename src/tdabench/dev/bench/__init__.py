"""Benchmarks that print numbers (never asserted in tests).

python -m tdabench.dev.bench gradients [--model tiny|llama-135m|PATH] [--samples N] [--batch-size B] [--peers]
    samples/s, on the same batches, of
      (a) our extractor, all components
      (b) our extractor, a selection (the last layer's MLP; a greedy-selected set; the nn.Linear
          weights, which is what Bergson's hooks cover)
      (c) the reference-style loop: bs=1, loss.backward(), clone every .grad
      (d) a plain batched forward+backward (the floor no per-sample extractor can beat)
      peers (--peers): torch.func vmap(grad), Opacus GradSampleModule, Bergson's hooks (when installed)
    all in one process, interleaved batch by batch (tdabench.dev.bench.kit): medians and interquartile
    ranges over rounds, each ratio taken per round; agreement and coverage against the bs=1 loop.
python -m tdabench.dev.bench store --model llama-135m --samples 64 --max-component-dim 65536 [--rounds R]
    write a gradient store with the dimension cap, interleaved round by round with the same
    extraction without the store: samples/s of both, peak RSS, file size against the estimate.
python -m tdabench.dev.bench greedy [--components 113 --queries 988 --candidates 5] [--rounds 5]
    greedy forward selection run to the end on a random similarity store of the published size,
    the three objectives interleaved.
python -m tdabench.dev.bench projections [--dim 1048576] [--k 4096 8192] [--samples 32] [--rounds 5]
    dense projections (ours: gaussian, rademacher, sjlt) against TRAK's BasicProjector (when the
    `traker` package is installed), interleaved; speed-up over TRAK per round.
python -m tdabench.dev.bench similarity [--model llama-135m] [--lengths 64 256] [--candidates 5 10] [--rounds 2]
    the similarity store streamed from the model (tdabench.streaming): candidate layout (b
    candidates per query) and dense layout, seconds per query, against the reference-style loop
    (bs=1 loss.backward() per sample, clone every grad, a float64 dot per pair), against the same
    stream with every component materialised, and (dense, where the cache fits) against
    cache-then-similarity; interleaved round by round, each round on other queries.
python -m tdabench.dev.bench checks [--results results] [--benchmarks benchmarks]
    what the integrity checks of a finished default study cost on its files (the read-back seal
    of every HDF5 file, checksum and finiteness passes, similarity and projection validation),
    against the jobs' own time (benchmarks/*.tsv).
python -m tdabench.dev.bench numerics [--model tiny|llama-135m] [--samples N] [--length L] [--rounds R] [--study]
    numerics: portable against native (tdabench.numerics). Each mode needs its own process (the
    kernel pins are read when torch loads), so every round starts one worker per mode, order
    rotating; a worker times fine-tuning steps and gradient extraction on the same examples
    (lengths drawn up to L, batches padded as the mode pads them) after a warm-up. --study also
    times the whole default study from scratch (snakemake in a temporary copy) in each mode.
python -m tdabench.dev.bench architectures [--jobs 2] [--output docs/architectures.md] [TYPE ...]
    every causal-LM architecture of transformers, built tiny: per-sample gradients vs the bs=1
    loop (tdabench.dev.architectures); writes the markdown table.

Each subcommand is the module of its name here (its `run(args)`); `kit` times contenders,
`workload` builds the models and batches they run on.
"""
