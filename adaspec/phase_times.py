"""Where a multi-command job's time went: run each command as a named phase, then print a table.

`make demo` runs every step through `run` (one JSON line per phase appended to a log) and ends
with `table`, so the user sees which of setup, data, cache builds, trainings, evaluation and
export took the minutes. Standard library only: it runs under the system Python before the
virtualenv exists (the setup phase builds it).

    python3 -m adaspec.phase_times run --log demo/phases.jsonl --name setup -- make setup
    python3 -m adaspec.phase_times table --log demo/phases.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


class PhaseLogError(ValueError):
    """A phase log that cannot be read as what `run` writes."""


def run_phase(log: Path, name: str, command: list[str]) -> int:
    """Run `command`, append {"name", "seconds", "returncode"} to `log`; its exit status."""
    if not command:
        raise PhaseLogError(f"phase {name!r}: no command given after --")
    print(f"==> {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        returncode = subprocess.call(command)
    except OSError as error:  # not found, not executable
        print(f"phase {name!r}: cannot run {command[0]!r}: {error.strerror}", file=sys.stderr)
        returncode = 127
    record = {"name": name, "seconds": time.perf_counter() - started, "returncode": returncode}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return returncode


def read_phases(log: Path) -> list[dict]:
    """The records of a phase log, in the order they ran."""
    if not log.is_file():
        raise PhaseLogError(f"phase log {log} does not exist; run the phases with 'run' first")
    records = []
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            seconds = float(record["seconds"])
            name = str(record["name"])
            returncode = int(record.get("returncode", 0))
        except (ValueError, KeyError, TypeError) as error:
            raise PhaseLogError(f"{log}:{number}: not a phase record ({error})") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise PhaseLogError(f"{log}:{number}: phase {name!r} has seconds = {seconds}")
        records.append({"name": name, "seconds": seconds, "returncode": returncode})
    return records


def _clock(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}:{rest:04.1f}"


def phase_table(records: list[dict]) -> str:
    """A plain-text table: each phase's wall time (m:ss.s), its share of the total, and a total
    line; a phase that failed is marked."""
    total = sum(r["seconds"] for r in records)
    width = max([len(r["name"]) for r in records] + [len("total")])
    lines = [f"{'phase':<{width}}  {'time':>8}  {'share':>6}"]
    for r in records:
        share = r["seconds"] / total if total > 0 else 0.0
        mark = "" if r["returncode"] == 0 else f"  FAILED (exit {r['returncode']})"
        lines.append(f"{r['name']:<{width}}  {_clock(r['seconds']):>8}  {share:>6.1%}{mark}")
    lines.append(f"{'total':<{width}}  {_clock(total):>8}  {1.0 if total > 0 else 0.0:>6.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaspec.phase_times", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one command as a named phase")
    run.add_argument("--log", type=Path, required=True)
    run.add_argument("--name", required=True)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    table = sub.add_parser("table", help="print where the time went")
    table.add_argument("--log", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "run":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            return run_phase(args.log, args.name, cmd)
        print(phase_table(read_phases(args.log)))
        return 0
    except PhaseLogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
