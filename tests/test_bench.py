"""Every benchmark and study runs: its documented smoke command on a tiny model.

The commands are read from the READMEs themselves (bench/README.md for the benchmarks,
studies/README.md for the studies), so the documented command is the one that runs; each writes
its JSON into a temporary folder (never bench/results/ or studies/results/), which must have the
same top-level keys as the committed results of that module (PACKAGE/results/NAME.json).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO

# package -> its modules that are helpers, not runnable benchmarks or studies
HELPERS = {"bench": {"__init__", "instruments"},
           "studies": {"__init__", "fidelity_measures", "decision_rule", "paper_setup"}}
PACKAGES = tuple(HELPERS)


def readme(package: str):
    return REPO / package / "README.md"


def results(package: str):
    return REPO / package / "results"


MODULES = sorted(f"{package}.{p.stem}" for package in PACKAGES
                 for p in (REPO / package).glob("*.py") if p.stem not in HELPERS[package])
SMOKE = re.compile(r"#\s*smoke\b")


def _readme_smoke_commands(package: str) -> dict[str, list[str]]:
    """PACKAGE.NAME -> the commands in PACKAGE/README.md marked `# smoke` (lines joined)."""
    commands: dict[str, list[str]] = {}
    fenced = False
    pending = ""
    for line in readme(package).read_text().splitlines():
        if line.startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = pending + line, ""
        if not SMOKE.search(command):
            continue
        command = SMOKE.split(command)[0].strip()
        name = re.search(r"-m (\w+)\.(\w+)", command)
        assert name and name.group(1) == package, \
            f"a smoke command in {package}/README.md that runs no {package} module: {command}"
        commands.setdefault(f"{package}.{name.group(2)}", []).append(command)
    return commands


def smoke_commands() -> dict[str, str]:
    """PACKAGE.NAME -> its README command marked `# smoke`, over bench/ and studies/."""
    commands: dict[str, list[str]] = {}
    for package in PACKAGES:
        commands.update(_readme_smoke_commands(package))
    for module, found in commands.items():
        package, name = module.split(".")
        assert len(found) == 1, f"{name} has {len(found)} smoke commands in {package}/README.md"
    return {module: found[0] for module, found in commands.items()}


# Benches whose results come from another machine: gpu_check's from a CUDA one (none has run
# it for this repository yet; its smoke run here checks the whole script on tiny shapes).
NOT_RUN_HERE = {"bench.gpu_check"}


def test_every_bench_and_study_has_one_documented_smoke_command():
    commands = smoke_commands()
    assert MODULES
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)
    missing, unknown = set(MODULES) - set(commands), set(commands) - set(MODULES)
    assert not missing, f"modules without a `# smoke` command in their README: {missing}"
    assert not unknown, f"smoke commands of no bench or study module: {unknown}"
    for module, command in commands.items():
        package, name = module.split(".")
        assert command.startswith(f".venv/bin/python -m {module} "), command
        assert f"--out $OUT/{name}.json" in command, \
            f"a smoke run must not write {package}/results"
        assert "/tmp/" not in command, "smoke commands take their folders from $TINY and $OUT"
    for module in MODULES:
        if module in NOT_RUN_HERE:
            continue
        package, name = module.split(".")
        assert (results(package) / f"{name}.json").is_file(), \
            f"{package}/results/{name}.json is missing"


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(smoke_commands()))
def test_documented_smoke_command_runs(module, tiny_model_dir, tmp_path):
    package, name = module.split(".")
    command = smoke_commands()[module]
    # The README's interpreter is the repository's .venv; run the one running the tests.
    command = command.replace(".venv/bin/python", shlex.quote(sys.executable), 1)
    env = {**os.environ, "TINY": str(tiny_model_dir), "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    got = json.loads((tmp_path / f"{name}.json").read_text())
    assert got.get("benchmark") == name, "a bench's or study's JSON names it under 'benchmark'"
    committed = results(package) / f"{name}.json"  # its absence fails the test above
    if committed.is_file():
        expected = set(json.loads(committed.read_text()))
        assert set(got) == expected, f"top-level keys differ: {sorted(set(got) ^ expected)}"
