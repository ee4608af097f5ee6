"""Studies (scientific experiments); run each as `python -m studies.NAME` (see studies/README.md).

They share the benchmarks' helpers (`bench/harness.py`) and write their results to
`studies/results/<name>.json`.
"""
