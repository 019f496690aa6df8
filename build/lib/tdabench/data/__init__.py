"""Benchmarks: training examples with ground truth and the queries that point back to them."""
