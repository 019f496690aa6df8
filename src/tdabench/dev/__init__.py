"""The dev wing: tools for the people who work on tdabench, not parts of a study. It holds the
benchmarks (`python -m tdabench.dev.bench`), the other per-sample gradient extractors they compare
against (`peers`), the sweep over every transformers causal-LM architecture (`architectures`) and
the renderer of the README's result blocks (`python -m tdabench.dev.docs`). The library
(`tdabench.*` outside `dev`) never imports it, so no pipeline stage's code digest depends on it
and changing a benchmark never reruns a rule (tests/test_layers.py keeps it so).
"""
