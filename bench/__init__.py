"""Benchmarks (speed and memory); run each as `python -m bench.NAME` (see bench/README.md).

The studies (scientific experiments) live in `studies/`; both use the scripts'
plumbing in `harness/`; what only benchmarks use is in `bench/instruments.py`.
"""
