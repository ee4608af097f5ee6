"""Benchmarks (speed and memory); run each as `python -m bench.NAME` (see bench/README.md).

The studies (scientific experiments) live in `studies/`; they share `bench/harness.py`.
"""
