"""How close the target cache build runs to the bare model forward, and where the rest goes.

One process, one model load, the same sequences and the same batch plan for both measures:

- bare: for every planned batch, `label_hidden_and_head` (the build's own forward path: the
  trunk over the padded batch, then the vocabulary head on the label rows only, in blocks of
  `LOGIT_ROWS`) and `cut_logits`; nothing else. `--plain-forward` also times `model(...).logits`
  (the head on every position), for reference.
- build: `build_stage(cfg, "target")` into a fresh temporary folder, progress bar off. The model
  is not loaded again: `models.load_model` is patched to hand back the loaded one, and the one
  real load is reported on its own, outside every tokens/s figure.

Repeats alternate the order (bare, build / build, bare, ...) so a drift of the machine's load
hits both sides. The build's pieces are timed by wrapping the functions it calls (setup:
reading and tokenising the task, writing the sequences, hashing the model file; per batch:
forward, head, top-K, encode; the shard writes, which run in the writer thread and overlap the
next shard's compute). tokens/s counts real (unpadded) tokens run through the model.

    .venv/bin/python bench/cache_build.py                       # ~3 min here
    .venv/bin/python bench/cache_build.py --limit 256 --repeats 3
    .venv/bin/python bench/cache_build.py --model /tmp/tiny --limit 16 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


# ---------------------------------------------------------------------------------------------
# Shared with cache_io.py


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


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[c if isinstance(c, str) else f"{c:,.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")


# ---------------------------------------------------------------------------------------------
# Timing wrappers


class Timers:
    """Seconds and calls per name; thread-safe (the shard writes run in another thread)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return timed


@contextlib.contextmanager
def instrumented_build(timers: Timers, loaded: tuple, marks: dict):
    """Patch what `build_stage` calls with timed versions; `load_model` returns `loaded`."""
    from adaspec import build, models, tasks
    from cache_tools import schema, store

    def load_model(*args, **kwargs):
        return loaded

    def label_hidden_and_head(*args, **kwargs):
        start = time.perf_counter()
        n, logits_fn = original_lhh(*args, **kwargs)
        timers.add("forward (trunk)", time.perf_counter() - start)
        return n, timers.wrap("head on label rows", logits_fn)

    def target_batch_fn(*args, **kwargs):
        compute = original_tbf(*args, **kwargs)

        def timed(batch):
            start = time.perf_counter()
            rows, tokens = compute(batch)
            marks["last_compute_end"] = time.perf_counter()
            marks["tokens"] = marks.get("tokens", 0) + tokens
            timers.add("compute_batch (all)", marks["last_compute_end"] - start)
            return rows, tokens

        return timed

    def run_shards(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_rs(*args, **kwargs)
        finally:
            marks["run_shards_end"] = time.perf_counter()
            timers.add("shard loop (_run_shards)", marks["run_shards_end"] - start)

    original_lhh, original_tbf = build.label_hidden_and_head, build._target_batch_fn
    original_rs = build._run_shards
    patches = [
        mock.patch.object(models, "load_model", load_model),
        mock.patch.object(models, "model_identity", timers.wrap(
            "model identity (weight hash)", models.model_identity)),
        mock.patch.object(models, "tokenizer_fingerprint", timers.wrap(
            "tokenizer fingerprint", models.tokenizer_fingerprint)),
        mock.patch.object(build, "ensure_sequences", timers.wrap(
            "sequences stage (all)", build.ensure_sequences)),
        mock.patch.object(tasks, "load_examples", timers.wrap("read task rows", tasks.load_examples)),
        mock.patch.object(tasks, "tokenize_examples", timers.wrap(
            "tokenise", tasks.tokenize_examples)),
        mock.patch.object(store, "write_sequences", timers.wrap(
            "write sequences", store.write_sequences)),
        mock.patch.object(build, "_load_sequences", timers.wrap(
            "read sequences back", build._load_sequences)),
        mock.patch.object(build, "label_hidden_and_head", label_hidden_and_head),
        mock.patch.object(build, "topk_rows", timers.wrap("top-K (log_softmax+topk+tail)",
                                                          build.topk_rows)),
        mock.patch.object(schema, "encode_rows", timers.wrap("encode ids (encode_rows)",
                                                             schema.encode_rows)),
        mock.patch.object(schema, "encode_logprobs", timers.wrap("encode values", schema.encode_logprobs)),
        mock.patch.object(build, "_target_batch_fn", target_batch_fn),
        mock.patch.object(build, "_run_shards", run_shards),
        mock.patch.object(store.StageWriter, "write_shard", timers.wrap(
            "write shard (writer thread)", store.StageWriter.write_shard)),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


# ---------------------------------------------------------------------------------------------
# The two measures


def bare_forward(model, seqs, masks, batches, pad_id: int, vocab_size: int) -> dict:
    """The build's forward path alone: trunk on each batch, head on its label rows."""
    from adaspec import models
    from adaspec.build import LOGIT_ROWS, label_hidden_and_head

    trunk = head = 0.0
    cpu, start = time.process_time(), time.perf_counter()
    for a, b in batches:
        t0 = time.perf_counter()
        n, logits_fn = label_hidden_and_head(model, seqs[a:b], masks[a:b], pad_id)
        t1 = time.perf_counter()
        for r in range(0, n, LOGIT_ROWS):
            models.cut_logits(logits_fn(r, min(n, r + LOGIT_ROWS)), vocab_size)
        trunk, head = trunk + t1 - t0, head + time.perf_counter() - t1
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "trunk_seconds": trunk, "head_seconds": head}


@torch.no_grad()
def plain_forward(model, seqs, batches, pad_id: int) -> float:
    """`model(...).logits` over each padded batch (the head on every position)."""
    from adaspec.build import _pad_batch

    start = time.perf_counter()
    for a, b in batches:
        input_ids, attention_mask = _pad_batch(seqs[a:b], pad_id)
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return time.perf_counter() - start


def full_build(cfg_overrides: dict, loaded: tuple) -> dict:
    """`build_stage` into a fresh temporary folder; returns wall time and the timed pieces."""
    from adaspec.build import build_stage
    from adaspec.config import build_config

    timers, marks = Timers(), {}
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        cfg = build_config(overrides={**cfg_overrides, "cache.cache": str(Path(tmp) / "cache")})
        with instrumented_build(timers, loaded, marks):
            cpu, start = time.process_time(), time.perf_counter()
            manifest = build_stage(cfg, "target", progress=False)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "pieces": dict(timers.seconds),
        "calls": dict(timers.calls),
        "tokens_through_model": marks.get("tokens", 0),
        "write_tail_seconds": marks.get("run_shards_end", 0) - marks.get("last_compute_end", 0),
        "counts": manifest["stages"]["sequences"]["counts"],
        "shards": manifest["stages"]["target"]["counts"]["shards"],
        "disk_bytes": disk,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="target spec (alias, dir, gguf)")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-files", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=48, help="task rows (default 48)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--value-encoding", default="float16", choices=["float16", "uint8q"])
    parser.add_argument("--id-encoding", default="plain", choices=["plain", "delta"])
    parser.add_argument("--shard-rows", type=int, default=None, help="default: the config's")
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=2, help="bare+build pairs, order alternated")
    parser.add_argument("--plain-forward", action="store_true",
                        help="also time model(...).logits (head on every position)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS / "cache_build.json"))
    args = parser.parse_args(argv)

    from adaspec import models, tasks
    from adaspec.build import order_sequences, plan_batches, resolve_dtype
    from adaspec.config import build_config

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "models.target": args.model, "data.task": args.task, "data.split": args.split,
        "data.data_files": args.data_files, "data.limit": args.limit,
        "data.max_length": args.max_length, "cache.topk": args.topk,
        "cache.batch_tokens": args.batch_tokens, "cache.value_encoding": args.value_encoding,
        "cache.id_encoding": args.id_encoding,
    }
    if args.shard_rows:
        overrides["cache.shard_rows"] = args.shard_rows
    if args.chunk_rows:
        overrides["cache.chunk_rows"] = args.chunk_rows
    cfg = build_config(overrides={**overrides, "cache.cache": "/nonexistent"})
    info = machine_info()

    start = time.perf_counter()
    dtype = resolve_dtype(cfg.models.dtype, torch.device("cpu"))
    model, tokenizer = models.load_model(args.model, dtype=dtype)
    model.eval()
    load_seconds = time.perf_counter() - start
    vocab_size = models.real_vocab_size(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # The build's own sequence order and batch plan (checked against the build's counts below).
    examples = tasks.load_examples(cfg.data.task, cfg.data.split, cfg.data.data_files,
                                   cfg.data.limit, cfg.data.seed)
    tokenized = tasks.tokenize_examples(examples, tokenizer, cfg.data.max_length,
                                        cfg.data.chat_template)
    seqs, masks, _ = order_sequences(tokenized)
    lengths = np.array([len(s) for s in seqs])
    batches = plan_batches(lengths, cfg.cache.batch_tokens)
    tokens = int(lengths.sum())
    label_rows = int(sum(int(m.sum()) for m in masks))
    padded = int(sum(int(lengths[a]) * (b - a) for a, b in batches))
    print(f"model {args.model} loaded in {load_seconds:.1f} s; {len(seqs)} sequences, {tokens} "
          f"tokens ({padded} padded), {label_rows} label rows, {len(batches)} batches")

    # Warm-up on the shortest batch (first-call allocations, thread pools).
    bare_forward(model, seqs, masks, batches[-1:], pad_id, vocab_size)

    runs = []
    for rep in range(args.repeats):
        order = ("bare", "build") if rep % 2 == 0 else ("build", "bare")
        run = {"order": order, "loadavg_before": os.getloadavg()}
        for what in order:
            if what == "bare":
                run["bare"] = bare_forward(model, seqs, masks, batches, pad_id, vocab_size)
            else:
                run["build"] = full_build(overrides, (model, tokenizer))
        if args.plain_forward:
            run["plain_forward_seconds"] = plain_forward(model, seqs, batches, pad_id)
        run["loadavg_after"] = os.getloadavg()
        if run["build"]["tokens_through_model"] != tokens:
            raise SystemExit(f"build ran {run['build']['tokens_through_model']} tokens, bare "
                             f"{tokens}: the sequences differ, the comparison is void")
        bare_s, build_s = run["bare"]["seconds"], run["build"]["seconds"]
        loop_s = run["build"]["pieces"]["shard loop (_run_shards)"]
        run["bare_tokens_per_s"] = tokens / bare_s
        run["build_tokens_per_s"] = tokens / build_s
        run["build_loop_tokens_per_s"] = tokens / loop_s
        run["ratio_build_over_bare"] = bare_s / build_s
        run["ratio_loop_over_bare"] = bare_s / loop_s
        # Process CPU time is less sensitive to other jobs on the machine (but counts the
        # writer thread's work, which the wall clock hides when it overlaps compute).
        run["ratio_build_over_bare_cpu"] = run["bare"]["cpu_seconds"] / run["build"]["cpu_seconds"]
        runs.append(run)
        print(f"repeat {rep}: bare {bare_s:.1f} s, build {build_s:.1f} s "
              f"(ratio {run['ratio_build_over_bare']:.3f}, cpu-time ratio "
              f"{run['ratio_build_over_bare_cpu']:.3f}), loadavg {run['loadavg_after'][0]:.2f}")

    def med(key):
        return statistics.median(r[key] for r in runs)

    summary = {
        "bare_tokens_per_s": med("bare_tokens_per_s"),
        "build_tokens_per_s": med("build_tokens_per_s"),
        "build_loop_tokens_per_s": med("build_loop_tokens_per_s"),
        "ratio_build_over_bare": med("ratio_build_over_bare"),
        "ratio_loop_over_bare": med("ratio_loop_over_bare"),
        "ratio_build_over_bare_cpu_time": med("ratio_build_over_bare_cpu"),
        "goal_ratio": 0.9,
    }
    if args.plain_forward:
        summary["plain_forward_tokens_per_s"] = statistics.median(
            tokens / r["plain_forward_seconds"] for r in runs)

    # Where the build's time goes (median over repeats), as a share of the bare forward.
    piece_names = list(runs[0]["build"]["pieces"])
    pieces = {n: statistics.median(r["build"]["pieces"].get(n, 0.0) for r in runs)
              for n in piece_names}
    bare_med = statistics.median(r["bare"]["seconds"] for r in runs)
    build_med = statistics.median(r["build"]["seconds"] for r in runs)
    compute = pieces["compute_batch (all)"]
    in_compute = sum(pieces.get(n, 0.0) for n in (
        "forward (trunk)", "head on label rows", "top-K (log_softmax+topk+tail)",
        "encode ids (encode_rows)", "encode values"))
    derived = {
        "compute_batch other (numpy copies, casts, cut)": compute - in_compute,
        "shard loop minus compute (queue, concat, write tail)":
            pieces["shard loop (_run_shards)"] - compute,
        "write tail after last compute (not overlapped)": statistics.median(
            r["build"]["write_tail_seconds"] for r in runs),
        "build outside shard loop (setup, manifests)": build_med - pieces["shard loop (_run_shards)"],
    }

    print()
    print(format_table(
        ["measure", "seconds", "tokens/s", "vs bare"],
        [["bare forward (trunk + head on label rows)", bare_med, tokens / bare_med, 1.0],
         ["  of which trunk", statistics.median(r["bare"]["trunk_seconds"] for r in runs), "", ""],
         ["  of which head on label rows",
          statistics.median(r["bare"]["head_seconds"] for r in runs), "", ""]]
        + ([["plain forward (model(...).logits)", statistics.median(
            r["plain_forward_seconds"] for r in runs), summary["plain_forward_tokens_per_s"],
             bare_med / statistics.median(r["plain_forward_seconds"] for r in runs)]]
           if args.plain_forward else [])
        + [["full build (build_stage, load excluded)", build_med, tokens / build_med,
            summary["ratio_build_over_bare"]],
           ["build shard loop only (no setup)", pieces["shard loop (_run_shards)"],
            summary["build_loop_tokens_per_s"], summary["ratio_loop_over_bare"]],
           ["model load (once, excluded)", load_seconds, "", ""]]))
    print()
    print(format_table(
        ["build piece (median s)", "seconds", "% of build", "calls"],
        [[n, s, 100 * s / build_med, runs[0]["build"]["calls"].get(n, 0)] for n, s in pieces.items()]
        + [[n, s, 100 * s / build_med, ""] for n, s in derived.items()]))
    print(f"\nbuild/bare tokens/s ratio {summary['ratio_build_over_bare']:.3f} "
          f"(goal >= 0.9; shard loop alone {summary['ratio_loop_over_bare']:.3f}; "
          f"by process CPU time {summary['ratio_build_over_bare_cpu_time']:.3f})")

    payload = {
        "benchmark": "cache_build",
        "what": {
            "bare": "label_hidden_and_head + head on label rows in LOGIT_ROWS blocks + cut_logits "
                    "per planned batch (the build's forward path, no top-K/encode/write)",
            "build": "build_stage(cfg, 'target', progress=False) into a fresh temp folder, "
                     "model load patched out (reported once as model_load_seconds)",
            "tokens": "real (unpadded) tokens run through the model",
        },
        "machine": info,
        "settings": {**vars(args), "config": cfg.to_dict()["cache"]},
        "data": {"sequences": len(seqs), "tokens": tokens, "padded_tokens": padded,
                 "label_rows": label_rows, "batches": len(batches), "vocab_size": vocab_size},
        "model_load_seconds": load_seconds,
        "summary": summary,
        "pieces_median_seconds": pieces,
        "derived_median_seconds": derived,
        "runs": runs,
    }
    write_json(Path(args.out), payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
