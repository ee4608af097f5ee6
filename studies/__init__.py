"""Studies (scientific experiments); run each as `python -m studies.NAME` (see studies/README.md).

They share the scripts' plumbing with the benchmarks (`harness/`, a package of its own: no
study imports bench/) and write their results to
`studies/results/<name>.json`.
"""
