"""Benchmarks and the fidelity study; run each as `python -m bench.NAME` (see bench/README.md)."""
