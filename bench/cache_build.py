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


class OtherLoad:
    """CPU seconds used by other processes between `start()` and `stop()` (from /proc/stat)."""

    def __init__(self):
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0, time.process_time()
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        return busy * self.tick, time.process_time()

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> float:
        busy, ours = self._read()
        return max(0.0, (busy - self.begin[0]) - (ours - self.begin[1]))


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[c if isinstance(c, str) else f"{c:,.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
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

    def target_batch_fn(cfg, model, seqs, masks, layout, pad_id, vocab_size):
        compute = original_tbf(cfg, model, seqs, masks, layout, pad_id, vocab_size)

        def paired_bare(batch):
            # The bare forward of the same batch at the same moment: other jobs on the machine
            # then slow both sides alike. Its time is taken out of the build's below.
            got = bare_forward(model, seqs, masks, [layout.batches[batch]], pad_id, vocab_size,
                               original_lhh)
            for key, value in got.items():
                marks[f"paired_bare_{key}"] = marks.get(f"paired_bare_{key}", 0.0) + value

        def timed(batch):
            if batch % 2 == 0:
                paired_bare(batch)
            start = time.perf_counter()
            rows, tokens = compute(batch)
            timers.add("compute_batch (all)", time.perf_counter() - start)
            marks["tokens"] = marks.get("tokens", 0) + tokens
            if batch % 2 == 1:
                paired_bare(batch)
            marks["last_compute_end"] = time.perf_counter()
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
        mock.patch.object(tasks, "load_examples", timers.wrap(
            "read task rows", tasks.load_examples)),
        mock.patch.object(tasks, "tokenize_examples", timers.wrap(
            "tokenise", tasks.tokenize_examples)),
        mock.patch.object(store, "write_sequences", timers.wrap(
            "write sequences", store.write_sequences)),
        mock.patch.object(build, "_load_sequences", timers.wrap(
            "read sequences back", build._load_sequences)),
        mock.patch.object(build, "label_hidden_and_head", label_hidden_and_head),
        mock.patch.object(build, "topk_rows", timers.wrap("top-K (log_softmax+topk+tail)",
                                                          build.topk_rows)),
        mock.patch.object(schema, "encode_rows", timers.wrap(
            "encode ids (encode_rows)", schema.encode_rows)),
        mock.patch.object(schema, "encode_logprobs", timers.wrap(
            "encode values", schema.encode_logprobs)),
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


def bare_forward(model, seqs, masks, batches, pad_id: int, vocab_size: int,
                 label_hidden_and_head=None) -> dict:
    """The build's forward path alone: trunk on each batch, head on its label rows."""
    from adaspec import build, models

    label_hidden_and_head = label_hidden_and_head or build.label_hidden_and_head

    trunk = head = 0.0
    others = OtherLoad()
    others.start()
    cpu, start = time.process_time(), time.perf_counter()
    for a, b in batches:
        t0 = time.perf_counter()
        n, logits_fn = label_hidden_and_head(model, seqs[a:b], masks[a:b], pad_id)
        t1 = time.perf_counter()
        for r in range(0, n, build.LOGIT_ROWS):
            models.cut_logits(logits_fn(r, min(n, r + build.LOGIT_ROWS)), vocab_size)
        trunk, head = trunk + t1 - t0, head + time.perf_counter() - t1
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "others_cpu_seconds": others.stop(), "trunk_seconds": trunk, "head_seconds": head}


@torch.no_grad()
def plain_forward(model, seqs, batches, pad_id: int) -> float:
    """`model(...).logits` over each padded batch (the head on every position)."""
    from adaspec.build import _pad_batch

    start = time.perf_counter()
    for a, b in batches:
        input_ids, attention_mask = _pad_batch(seqs[a:b], pad_id)
        _ = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return time.perf_counter() - start


def topk_fused(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """A candidate for `build.topk_rows` with the same outputs: top-K of the logits themselves
    (same order as of the log-probs), one logsumexp for the normaliser, and the tail's
    logsumexp with the top-K masked in place (no full-vocabulary log_softmax, no copy).
    Overwrites `logits`, which the build's compute owns (fresh head output)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    values, ids = torch.topk(logits, k, dim=-1)  # (n, K)
    logits.scatter_(1, ids, float("-inf"))
    return {"ids": ids, "logprobs": values - lse[:, None],
            "tail_logmass": torch.logsumexp(logits, dim=-1) - lse}


def topk_variants(logits: torch.Tensor, k: int, repeats: int) -> dict:
    """`build.topk_rows` vs `topk_fused` on the same real logits, alternated; and their outputs."""
    from adaspec.build import topk_rows

    times: dict[str, list[float]] = {"topk_rows": [], "topk_fused": []}
    for _ in range(repeats):
        for name, fn in (("topk_rows", topk_rows), ("topk_fused", topk_fused)):
            x = logits.clone()
            start = time.perf_counter()
            fn(x, k)
            times[name].append(time.perf_counter() - start)
    a, b = topk_rows(logits.clone(), k), topk_fused(logits.clone(), k)
    finite = torch.isfinite(a["tail_logmass"])
    return {
        "rows": int(logits.shape[0]),
        "seconds": times,
        "median_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "ids_identical": bool(torch.equal(a["ids"], b["ids"])),
        "max_abs_diff_logprobs": float((a["logprobs"] - b["logprobs"]).abs().max()),
        "max_abs_diff_tail_logmass": float(
            (a["tail_logmass"] - b["tail_logmass"])[finite].abs().max()),
    }


def full_build(cfg_overrides: dict, loaded: tuple) -> dict:
    """`build_stage` into a fresh temporary folder; returns wall time and the timed pieces."""
    from adaspec.build import build_stage
    from adaspec.config import build_config

    timers, marks = Timers(), {}
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        cfg = build_config(overrides={**cfg_overrides, "cache.cache": str(Path(tmp) / "cache")})
        with instrumented_build(timers, loaded, marks):
            others = OtherLoad()
            others.start()
            cpu, start = time.process_time(), time.perf_counter()
            manifest = build_stage(cfg, "target", progress=False)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            others_cpu = others.stop()
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    paired_s, paired_cpu = marks["paired_bare_seconds"], marks["paired_bare_cpu_seconds"]
    return {
        "seconds_with_paired_bare": seconds,
        "seconds": seconds - paired_s,
        "cpu_seconds": cpu - paired_cpu,
        "others_cpu_seconds_with_paired_bare": others_cpu,
        "paired_bare": {k.removeprefix("paired_bare_"): v for k, v in marks.items()
                        if k.startswith("paired_bare_")},
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
    parser.add_argument("--topk-repeats", type=int, default=7,
                        help="alternated timings of topk_rows vs topk_fused")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's)")
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
        "cache.id_encoding": args.id_encoding, "cache.sparse": "topk",
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

    # Warm-up on the shortest batch (first-call allocations, thread pools); its first label
    # rows' logits also serve the top-K micro-benchmark.
    bare_forward(model, seqs, masks, batches[-1:], pad_id, vocab_size)
    from adaspec.build import LOGIT_ROWS, label_hidden_and_head

    a, b = batches[-1]
    n, logits_fn = label_hidden_and_head(model, seqs[a:b], masks[a:b], pad_id)
    sample_logits = models.cut_logits(logits_fn(0, min(n, LOGIT_ROWS)), vocab_size).contiguous()
    topk_bench = topk_variants(sample_logits, cfg.cache.topk, args.topk_repeats)
    del sample_logits, logits_fn

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
        build = run["build"]
        if build["tokens_through_model"] != tokens:
            raise SystemExit(f"build ran {build['tokens_through_model']} tokens, bare "
                             f"{tokens}: the sequences differ, the comparison is void")
        pieces = build["pieces"]
        build_s = build["seconds"]  # the paired bare forwards taken out
        loop_s = pieces["shard loop (_run_shards)"] - build["paired_bare"]["seconds"]
        in_build_forward = pieces["forward (trunk)"] + pieces["head on label rows"]
        run.update({
            "bare_tokens_per_s": tokens / run["bare"]["seconds"],
            "paired_bare_tokens_per_s": tokens / build["paired_bare"]["seconds"],
            "build_tokens_per_s": tokens / build_s,
            "build_loop_tokens_per_s": tokens / loop_s,
            # Three estimates of build/bare, from the noisiest to the least noisy here:
            # a separate bare pass; the bare forward of each batch run right beside the build's
            # (same moment, same load); the share of the build's own time in its forward path.
            "ratio_separate": run["bare"]["seconds"] / build_s,
            "ratio_paired": build["paired_bare"]["seconds"] / build_s,
            "ratio_paired_loop_only": build["paired_bare"]["seconds"] / loop_s,
            "ratio_forward_share": in_build_forward / build_s,
            # Process CPU time also counts the writer thread's work, hidden from the wall clock.
            "ratio_paired_cpu": build["paired_bare"]["cpu_seconds"] / build["cpu_seconds"],
        })
        runs.append(run)
        # Cores other processes kept busy: the noise each measure ran under.
        run["others_cores_bare"] = run["bare"]["others_cpu_seconds"] / run["bare"]["seconds"]
        run["others_cores_paired_bare"] = (build["paired_bare"]["others_cpu_seconds"]
                                           / build["paired_bare"]["seconds"])
        run["others_cores_build"] = ((build["others_cpu_seconds_with_paired_bare"]
                                      - build["paired_bare"]["others_cpu_seconds"]) / build_s)
        print(f"repeat {rep}: bare {run['bare']['seconds']:.1f} s, paired bare "
              f"{build['paired_bare']['seconds']:.1f} s, build {build_s:.1f} s; build/bare "
              f"separate {run['ratio_separate']:.3f}, paired {run['ratio_paired']:.3f}, forward "
              f"share {run['ratio_forward_share']:.3f}; other processes' cores: bare "
              f"{run['others_cores_bare']:.2f}, paired {run['others_cores_paired_bare']:.2f}, "
              f"build {run['others_cores_build']:.2f}")

    def med(key):
        return statistics.median(r[key] for r in runs)

    summary = {k: med(k) for k in (
        "bare_tokens_per_s", "paired_bare_tokens_per_s", "build_tokens_per_s",
        "build_loop_tokens_per_s", "ratio_separate", "ratio_paired", "ratio_paired_loop_only",
        "ratio_forward_share", "ratio_paired_cpu", "others_cores_bare",
        "others_cores_paired_bare", "others_cores_build")}
    summary["goal_ratio"] = 0.9
    if args.plain_forward:
        summary["plain_forward_tokens_per_s"] = statistics.median(
            tokens / r["plain_forward_seconds"] for r in runs)

    # Where the build's time goes (medians over repeats).
    pieces = {n: statistics.median(r["build"]["pieces"].get(n, 0.0) for r in runs)
              for n in runs[0]["build"]["pieces"]}
    pieces["shard loop (_run_shards)"] -= statistics.median(
        r["build"]["paired_bare"]["seconds"] for r in runs)
    bare_med = statistics.median(r["bare"]["seconds"] for r in runs)
    paired_med = statistics.median(r["build"]["paired_bare"]["seconds"] for r in runs)
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
        "build outside shard loop (setup, manifests)":
            build_med - pieces["shard loop (_run_shards)"],
    }

    def trunk_head(key):
        return statistics.median(r["bare"][key] for r in runs)

    rows = [["bare forward, separate pass", bare_med, tokens / bare_med, ""],
            ["  of which trunk", trunk_head("trunk_seconds"), "", ""],
            ["  of which head on label rows", trunk_head("head_seconds"), "", ""],
            ["bare forward, paired with the build", paired_med, tokens / paired_med, ""]]
    if args.plain_forward:
        plain = statistics.median(r["plain_forward_seconds"] for r in runs)
        rows.append(["plain forward (model(...).logits)", plain, tokens / plain, ""])
    rows += [["full build (load and paired bare excluded)", build_med, tokens / build_med, ""],
             ["  build/bare: separate pass", "", "", summary["ratio_separate"]],
             ["  build/bare: paired", "", "", summary["ratio_paired"]],
             ["  build/bare: paired, shard loop only", "", "", summary["ratio_paired_loop_only"]],
             ["  build/bare: forward share of build time", "", "",
              summary["ratio_forward_share"]],
             ["  build/bare: paired, process CPU time", "", "", summary["ratio_paired_cpu"]],
             ["model load (once, excluded)", load_seconds, "", ""]]
    print()
    print(format_table(["measure (median of repeats)", "seconds", "tokens/s", "ratio"], rows))
    print()
    print(format_table(
        ["build piece (median s)", "seconds", "% of build", "calls"],
        [[n, s, 100 * s / build_med, runs[0]["build"]["calls"].get(n, 0)]
         for n, s in pieces.items()]
        + [[n, s, 100 * s / build_med, ""] for n, s in derived.items()]))
    tb = topk_bench["median_ms"]
    per_row_gain = (tb["topk_rows"] - tb["topk_fused"]) / 1e3 / topk_bench["rows"]
    topk_bench["projected_build_seconds_saved"] = per_row_gain * label_rows
    topk_bench["projected_ratio_paired"] = paired_med / (build_med - per_row_gain * label_rows)
    print()
    print(format_table(
        [f"top-K on {topk_bench['rows']} real label rows (K={cfg.cache.topk})", "median ms",
         "vs topk_rows"],
        [["build.topk_rows (log_softmax, topk, scatter copy, logsumexp)", tb["topk_rows"], 1.0],
         ["topk_fused (logsumexp, topk, in-place scatter, logsumexp)", tb["topk_fused"],
          tb["topk_rows"] / tb["topk_fused"]]]))
    print(f"topk_fused: ids identical {topk_bench['ids_identical']}, max |d logprob| "
          f"{topk_bench['max_abs_diff_logprobs']:.2e}, max |d tail| "
          f"{topk_bench['max_abs_diff_tail_logmass']:.2e}; projected: "
          f"{topk_bench['projected_build_seconds_saved']:.1f} s less build, paired ratio "
          f"{topk_bench['projected_ratio_paired']:.3f}")
    print(f"\nbuild/bare tokens/s: paired {summary['ratio_paired']:.3f}, forward share "
          f"{summary['ratio_forward_share']:.3f}, separate {summary['ratio_separate']:.3f} "
          "(goal >= 0.9)")

    payload = {
        "benchmark": "cache_build",
        "what": {
            "bare": "label_hidden_and_head + head on label rows in LOGIT_ROWS blocks + cut_logits "
                    "per planned batch (the build's forward path, no top-K/encode/write)",
            "build": "build_stage(cfg, 'target', progress=False) into a fresh temp folder, "
                     "model load patched out (reported once as model_load_seconds)",
            "paired bare": "inside the build, the bare forward of each batch run just before "
                           "(even batches) or after (odd) the build computes it; its time is "
                           "subtracted from the build's",
            "ratio_forward_share": "(trunk + head time inside the build) / build time",
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
        "topk_variants": topk_bench,
        "runs": runs,
    }
    write_json(Path(args.out), payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
