"""Benchmarks: every figure is a ratio to a raw limit measured in the same run.

``python -m bench`` runs all figures (``--quick`` for a smaller run, ``--only NAME``),
writes bench/results.json and the table in docs/performance.md.
"""
