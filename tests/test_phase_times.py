"""The demo's phase-time table: phases recorded as they run, the table's times, shares and total."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adaspec.phase_times import PhaseLogError, main, phase_table, read_phases, run_phase


def test_table_gives_each_phase_its_time_and_share_and_the_total():
    records = [{"name": "setup", "seconds": 75.0, "returncode": 0},
               {"name": "train: reference", "seconds": 150.5, "returncode": 0},
               {"name": "eval", "seconds": 74.5, "returncode": 0}]
    lines = phase_table(records).splitlines()
    assert lines[0].split() == ["phase", "time", "share"]
    rows = {line[:16].strip(): line[16:].split() for line in lines[1:]}
    assert rows["setup"] == ["1:15.0", "25.0%"]
    assert rows["train: reference"] == ["2:30.5", "50.2%"]
    assert rows["eval"] == ["1:14.5", "24.8%"]
    assert rows["total"] == ["5:00.0", "100.0%"]


def test_a_failed_phase_is_marked_in_the_table():
    table = phase_table([{"name": "build", "seconds": 3.0, "returncode": 0},
                         {"name": "train", "seconds": 1.0, "returncode": 2}])
    train_line = next(line for line in table.splitlines() if line.startswith("train"))
    assert "FAILED (exit 2)" in train_line
    assert "FAILED" not in next(line for line in table.splitlines() if line.startswith("build"))


def test_run_records_time_and_exit_status_and_passes_the_status_on(tmp_path):
    log = tmp_path / "phases.jsonl"
    ok = run_phase(log, "sleep", [sys.executable, "-c", "import time; time.sleep(0.2)"])
    bad = run_phase(log, "fail", [sys.executable, "-c", "raise SystemExit(3)"])
    missing = run_phase(log, "missing", [str(tmp_path / "no-such-program")])
    assert (ok, bad, missing) == (0, 3, 127)
    records = read_phases(log)
    assert [r["name"] for r in records] == ["sleep", "fail", "missing"]
    assert records[0]["seconds"] >= 0.2
    assert [r["returncode"] for r in records] == [0, 3, 127]


def test_cli_runs_phases_and_prints_the_table(tmp_path):
    """As `make demo` calls it: under a plain python, `run ... -- cmd` then `table`."""
    log = tmp_path / "demo" / "phases.jsonl"
    run = [sys.executable, "-m", "adaspec.phase_times", "run", "--log", str(log)]
    ok = subprocess.run(run + ["--name", "one", "--", sys.executable, "-c", "pass"])
    assert ok.returncode == 0
    failed = subprocess.run(run + ["--name", "two", "--", sys.executable, "-c", "exit(4)"])
    assert failed.returncode == 4  # make stops at the failed phase
    table = subprocess.run([sys.executable, "-m", "adaspec.phase_times", "table", "--log",
                            str(log)], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["one", "two", "total"]


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ('{"name": "a", "seconds": 1}\nnot json\n', ":2: not a phase record"),
    ('{"name": "a"}\n', ":1: not a phase record"),
    ('{"name": "a", "seconds": NaN}\n', "seconds = nan"),
    ('{"name": "a", "seconds": -1}\n', "seconds = -1"),
])
def test_a_bad_log_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    log = tmp_path / "phases.jsonl"
    if content is not None:
        log.write_text(content)
    with pytest.raises(PhaseLogError, match=message):
        read_phases(log)
    assert main(["table", "--log", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_phases_append_across_calls(tmp_path):
    log = tmp_path / "phases.jsonl"
    log.write_text(json.dumps({"name": "earlier", "seconds": 2.0, "returncode": 0}) + "\n")
    run_phase(log, "later", [sys.executable, "-c", "pass"])
    assert [r["name"] for r in read_phases(log)] == ["earlier", "later"]
