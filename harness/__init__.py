"""What the benchmarks (bench/) and the studies (studies/) share: paths, machine info, one
timer, alternated rounds, tables, JSON and the common flags.

The machine is shared and its load drifts over minutes, so a script measures its baseline in
the same run, alternates what it compares (`rotated`, `alternate`), notes the CPU time other
processes took meanwhile (`measure`, `OtherLoad`) and writes the raw numbers with the machine's
description (`write_json`). It belongs to neither annex: bench/ and studies/ both import it and
never each other.

Run a benchmark as `python -m bench.NAME` and a study as `python -m studies.NAME` from the
repository root (bench/README.md, studies/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from adaspec import models

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Each real task's rows under ../shared/data (see its SOURCES.md); arith is generated.
TASK_FILES = {
    "gsm8k": "gsm8k/train.jsonl",
    "alpaca": "alpaca/alpaca_5000.json",
    "mbpp": "mbpp/mbpp.jsonl",
    "cnn_dailymail": "cnn_dailymail/cnn_dailymail_validation_subset.csv",
    "xsum": "xsum/xsum-1000.jsonl",
}
DEFAULT_DATA = SHARED_DATA / TASK_FILES["gsm8k"]


def task_data(task: str) -> str | None:
    """The data file of a real task under ../shared/data (None for arith, which is generated);
    a task without one, or a file that is not there, is an error."""
    if task == "arith":
        return None
    if task not in TASK_FILES:
        raise SystemExit(f"no data file for task {task!r} (known: arith, {', '.join(TASK_FILES)})")
    path = SHARED_DATA / TASK_FILES[task]
    if not path.is_file():
        raise SystemExit(f"{path}: the {task} rows are not there (see ../shared/data/SOURCES.md)")
    return str(path)


def results_dir(package: str) -> Path:
    """Where a script of `package` ("bench" or "studies") writes its results JSON."""
    if package not in ("bench", "studies"):
        raise ValueError(f"results of bench/ or studies/, not {package!r}")
    return REPO / package / "results"


# ---------------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict:
    """What the numbers were measured on (the machine is shared: loadavg shows the noise)."""
    import numcodecs
    import transformers
    import zarr

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


class OtherLoad:
    """CPU seconds used by other processes between `start()` and `stop()` (from /proc/stat)."""

    def __init__(self):
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK")
        self.begin = (0.0, 0.0)

    def read(self) -> tuple[float, float]:
        """(busy CPU seconds of the whole machine, this process's CPU seconds)."""
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0, time.process_time()
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        return busy * self.tick, time.process_time()

    def start(self) -> None:
        self.begin = self.read()

    def stop(self) -> float:
        busy, ours = self.read()
        return max(0.0, (busy - self.begin[0]) - (ours - self.begin[1]))


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Span:
    """One measured stretch of the run (filled in when its `measure` block ends)."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """This process's CPU time (all its threads)."""
    others_cpu_seconds: float = 0.0
    """CPU time of every other process meanwhile: the noise the stretch ran under."""
    loadavg_before: tuple = ()
    loadavg_after: tuple = ()

    @property
    def others_cores(self) -> float:
        return self.others_cpu_seconds / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def measure() -> Iterator[Span]:
    """Wall and process CPU time of the block, and what other processes used meanwhile."""
    span = Span(loadavg_before=os.getloadavg())
    others = OtherLoad()
    others.start()
    cpu, start = time.process_time(), time.perf_counter()
    try:
        yield span
    finally:
        span.seconds = time.perf_counter() - start
        span.cpu_seconds = time.process_time() - cpu
        span.others_cpu_seconds = others.stop()
        span.loadavg_after = os.getloadavg()


class Timers:
    """Seconds and calls per piece name; thread-safe (writer and prefetch threads add too)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, name: str, seconds: float, calls: int = 1) -> None:
        with self.lock:
            self.seconds[name] += seconds
            self.calls[name] += calls

    def wrap(self, name: str | Callable[..., str | None], fn: Callable) -> Callable:
        """`fn` timed under `name`: a string, or a function of fn's arguments giving the name
        (None: that call is not timed)."""

        def timed(*args, **kwargs):
            piece = name if isinstance(name, str) else name(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if piece is not None:
                    self.add(piece, time.perf_counter() - start)

        return timed

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        """(seconds, calls) per piece since the last `take`, and start afresh."""
        with self.lock:
            out = dict(self.seconds), dict(self.calls)
            self.seconds.clear()
            self.calls.clear()
        return out


def rotated(items: Sequence, round_index: int) -> list:
    """`items` rotated by the round: each comes first in turn, so a drift of the machine's load
    hits every one alike over the rounds."""
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])


def alternate(measures: dict[str, Callable[[int], Any]], rounds: int) -> list[dict]:
    """Run every measure once per round, the order rotated each round.

    measures: name -> fn(round index) -> result. Returns one dict per round: {"round", "order",
    <name>: result}.
    """
    out = []
    for rnd in range(rounds):
        order = rotated(list(measures), rnd)
        entry: dict[str, Any] = {"round": rnd, "order": order}
        for name in order:
            entry[name] = measures[name](rnd)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# Patching the library (public names only) and serving loaded models


@contextlib.contextmanager
def patched(*patches: tuple[object, str, object]) -> Iterator[None]:
    """Replace `owner.name` by `value` for each (owner, name, value) inside the block.

    A benchmark reaches the library through its public names only: a private name is refused.
    """
    for owner, name, _ in patches:
        if name.startswith("_"):
            raise ValueError(f"benchmarks patch public names only, not {owner!r}.{name}")
        if not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no {name}: the library changed, update the bench")
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield


def serving_models(serve: Callable[[str], tuple | None]) -> tuple[object, str, object]:
    """A patch of `models.load_model`: `serve(spec)` hands back an already-loaded (model,
    tokenizer), or None to load the spec for real. For `patched`."""
    load = models.load_model

    def load_model(spec, *args, **kwargs):
        served = serve(str(spec))
        return served if served is not None else load(spec, *args, **kwargs)

    return (models, "load_model", load_model)


# ---------------------------------------------------------------------------------------------
# Flags, tables and results


def parser(name: str, doc: str, rounds: int | None = None, data: bool = True,
           progress: bool = False, package: str = "bench") -> argparse.ArgumentParser:
    """The flags every benchmark takes: --out (default PACKAGE/results/NAME.json) and --threads;
    --rounds (alternated rounds), --data-files (task rows) and --progress where they apply.
    `package` is the module's package: "bench" for a benchmark, "studies" for a study."""
    results = results_dir(package)
    p = argparse.ArgumentParser(prog=f"python -m {package}.{name}",
                                description=doc.split("\n\n")[0])
    p.add_argument("--out", default=str(results / f"{name}.json"),
                   help=f"JSON results file (default {package}/results/{name}.json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds,
                       help=f"rounds of the compared measures, order rotated (default {rounds})")
    if data:
        p.add_argument("--data-files", default=str(DEFAULT_DATA),
                       help="task rows (default ../shared/data/gsm8k/train.jsonl)")
    if progress:
        p.add_argument("--progress", action="store_true", help="show the runs' progress bars")
    return p


def start(args: argparse.Namespace) -> dict:
    """Apply the common flags (threads; progress bars off unless --progress); machine info."""
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if not getattr(args, "progress", False):
        transformers.utils.logging.disable_progress_bar()
    return machine_info()


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table; numbers with 4 significant digits, the first column left-aligned."""
    cells = [header] + [[c if isinstance(c, str) else f"{c:,.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    """Write the results (numpy/torch scalars as floats); prints where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")  # a kill mid-write leaves the old file whole
    part.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    part.replace(path)
    print(f"wrote {path}")
