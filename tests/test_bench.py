"""Every benchmark runs: its documented smoke command (bench/README.md) on a tiny model.

The commands are read from the README itself, so the documented command is the one that runs;
each writes its JSON into a temporary folder (never bench/results/), which must have the same
top-level keys as the committed results of that bench.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

README = REPO / "bench" / "README.md"
RESULTS = REPO / "bench" / "results"
NOT_BENCHES = {"__init__", "harness", "fidelity_measures"}  # bench/ modules that are helpers
BENCHES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem not in NOT_BENCHES)
SMOKE = re.compile(r"#\s*smoke\b")


def smoke_commands() -> dict[str, str]:
    """bench name -> its README command marked `# smoke` (continuation lines joined)."""
    commands: dict[str, list[str]] = {}
    fenced = False
    pending = ""
    for line in README.read_text().splitlines():
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
        name = re.search(r"-m bench\.(\w+)", command)
        assert name, f"a smoke command that runs no bench module: {command}"
        commands.setdefault(name.group(1), []).append(command)
    for name, found in commands.items():
        assert len(found) == 1, f"bench {name} has {len(found)} smoke commands in the README"
    return {name: found[0] for name, found in commands.items()}


# Benches whose results come from another machine: gpu_check's from a CUDA one (none has run
# it for this repository yet; its smoke run here checks the whole script on tiny shapes).
NOT_RUN_HERE = {"gpu_check"}


def test_every_bench_has_one_documented_smoke_command():
    commands = smoke_commands()
    assert BENCHES
    missing, unknown = set(BENCHES) - set(commands), set(commands) - set(BENCHES)
    assert not missing, f"benches without a `# smoke` command in bench/README.md: {missing}"
    assert not unknown, f"smoke commands of no bench module: {unknown}"
    for name, command in commands.items():
        assert command.startswith(f".venv/bin/python -m bench.{name} "), command
        assert f"--out $OUT/{name}.json" in command, "a smoke run must not write bench/results"
        assert "/tmp/" not in command, "smoke commands take their folders from $TINY and $OUT"
    for name in BENCHES:
        if name in NOT_RUN_HERE:
            continue
        assert (RESULTS / f"{name}.json").is_file(), f"bench/results/{name}.json is missing"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(smoke_commands()))
def test_documented_smoke_command_runs(name, tiny_model_dir, tmp_path):
    command = smoke_commands()[name]
    # The README's interpreter is the repository's .venv; run the one running the tests.
    command = command.replace(".venv/bin/python", shlex.quote(sys.executable), 1)
    env = {**os.environ, "TINY": str(tiny_model_dir), "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    got = json.loads((tmp_path / f"{name}.json").read_text())
    assert got.get("benchmark") == name, "a bench's JSON names it under 'benchmark'"
    committed = RESULTS / f"{name}.json"  # its absence fails the test above
    if committed.is_file():
        expected = set(json.loads(committed.read_text()))
        assert set(got) == expected, f"top-level keys differ: {sorted(set(got) ^ expected)}"
