"""Benchmarks of MM-GEM against the stock components it is built from (CLIP-style towers, causal LMs, LLaVA).

Run `python -m benchmarks.run --help` (or `make bench`). Every comparison runs both sides in one process on the same
weights, interleaved, and reports the ratio ours / baseline (lower is better).
"""
