"""What one AdaSPEC draft step costs when read from the cache, from memory, or computed online.

Every timed step is a step of the real loop, `adaspec.train.train(cfg, max_steps=...)`, on the
same batches (same cache, seed and batch size, hence the same batch order) from the same draft
initialisation; only where the target side comes from changes:

- (a) cached: batches from `BatchStream` over the cache (sequences, the target's top-K rows
  decoded, the reference's per-token losses; read in its prefetch thread), then the draft's
  forward, sparse loss, AdaSPEC selection (k=0.4), backward, clipping and AdamW step.
- (b) in memory: the same loop with `BatchStream.batches` replaced by the same batches read and
  decoded beforehand, so (a)/(b) is what streaming and decoding from the cache cost a step.
- (c) online (`train.online`): the target and the reference run live on each batch (their
  forwards, dense losses) before the same draft step, so (c)/(a) is what the cache saves a step.

Models are loaded once (the target from its spec; the draft cut from it when the spec is
`<target>@layers=N`) and handed to `train` through a patched `models.load_model`, each run getting
a fresh copy of the draft. Each configuration runs `--warmup` steps (not counted) then `--steps`
timed ones, per round; rounds rotate the order of (a), (b), (c) so a drift of the machine's load
hits all three. Step time is the difference of consecutive `elapsed` values in the run's
metrics.jsonl (the whole loop iteration); tokens/s counts real (unpadded) tokens. The timed steps
stay within the first epoch, so no checkpoint is written inside them. The step's pieces are timed
by wrapping public names: `BatchStream.batches` (the loop's wait) and `.load` (prefetch thread),
`labels.LabelLogits` (the online target and reference forwards), `step.LossModel.forward`.

Peak RSS: a cached run of `--rss-steps` steps (the plain `train`, models loaded from disk) in a
fresh subprocess per data size, so peaks do not mix; and one online run at 1x for comparison.
"peak, steps" is the high-water mark after the last model load (reset through
/proc/self/clear_refs), i.e. the training itself.

Data: `--limit` task rows are built into a real cache (`build_stage`: the target stage with the
target, the ref stage with the untrained draft as reference: only the timing matters here). The
larger sizes (`--scales`) repeat that cache's sequences and stored rows S times, written through
`CacheWriter` (`write_sequences`, `open_stage`, `write_stored_shard`, `finish`; same encoding,
chunks and shards), which costs no model time and makes the sizes differ in nothing but size. The
timed runs use the largest cache. Commands: bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import harness
from adaspec import build, labels, models, runs, step
from adaspec.config import build_config
from adaspec.stream import BatchStream
from adaspec.train import train
from bench import instruments
from cache_tools import manifest as cache_manifest
from cache_tools import schema, store

MODES = {
    "cached": "(a) cached: BatchStream -> draft step",
    "in_memory": "(b) in-memory batches -> draft step",
    "online": "(c) online: target + ref live -> draft step",
}


# ---------------------------------------------------------------------------------------------
# Memory of the current process (Linux /proc)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """High-water RSS since the process started or since the last `reset_peak_rss`."""
    return status_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Caches


def replicate_cache(src: Path, dst: Path, task: str, split: str, times: int) -> None:
    """Write `src`'s split into `dst` with every sequence and stored row repeated `times` times.

    The stored (encoded) arrays are copied as they are, through the cache's writer and with the
    same shard and chunk shapes, so only the size differs. The manifest notes the replication.
    """
    reader = store.CacheReader(str(src), task, split)
    seqs, masks = reader.sequence_lists()
    writer = store.CacheWriter(str(dst), task, split)
    writer.write_sequences(seqs * times, masks * times, np.tile(reader.source_index, times),
                           reader.vocab_size, reader.sequence_params,
                           reader.manifest.package_version)
    for stage, entry in reader.manifest.stages.items():
        if stage == schema.SEQUENCES:
            continue
        # stored row arrays only: `_done`, `_sha256` are the writer's bookkeeping
        stored = {n: a for n, a in reader.group[stage].arrays() if not n.startswith("_")}
        rows = reader.stored_rows(stage, 0, reader.n_label_rows)
        values = {n: np.concatenate([v] * times) for n, v in rows.items()}
        first = stored[sorted(stored)[0]]
        stage_writer = writer.open_stage(stage, entry.params, reader.vocab_size, first.shards[0],
                                         first.chunks[0])
        for shard in stage_writer.pending_shards():
            a, b = stage_writer.shard_range(shard)
            stage_writer.write_stored_shard(shard, {n: v[a:b] for n, v in values.items()})
        stage_writer.finish()
    for name, record in reader.recorded_refs.items():
        writer.record_ref(name, record)
    manifest = writer.manifest
    manifest.extra["replicated"] = {"from": str(src), "times": times}
    cache_manifest.write(writer.group, manifest)


def cache_facts(root: Path, task: str, split: str) -> dict:
    """Sequences, tokens, label rows, bytes on disk and bytes of every row decoded in memory."""
    reader = store.CacheReader(str(root), task, split)
    counts = reader.manifest.stages[schema.SEQUENCES].counts
    k = reader.target_params[schema.K]
    # CacheReader decodes ids to int64 and values to float32; tail and 4 ref losses float32.
    decoded = counts["label_tokens"] * (k * (8 + 4) + 4 + 4 * len(schema.DIVERGENCES))
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {**counts, "k": k, "disk_bytes": disk, "decoded_bytes": decoded}


# ---------------------------------------------------------------------------------------------
# One timed run of the real loop


def waited(timers: harness.Timers, inner):
    """The batches of `inner`, with the loop's wait for each one timed."""
    try:
        while True:
            start = time.perf_counter()
            try:
                batch = next(inner)
            except StopIteration:
                return
            timers.add("wait for the next batch", time.perf_counter() - start)
            yield batch
    finally:
        if hasattr(inner, "close"):
            inner.close()


def timed_run(mode: str, overrides: dict, run_dir: Path, max_steps: int, batches: list,
              target) -> dict:
    """`train(cfg, max_steps)` in `mode`; per-step seconds and losses from its metrics.jsonl,
    and the pieces of a step timed by wrapping what the loop calls."""
    timers = harness.Timers()
    original_batches = BatchStream.batches

    def timed_batches(self, start_batch=0, stop_batch=None):
        # (b) serves the batches decoded beforehand; every mode times the loop's wait for one.
        inner = (iter(batches[start_batch:stop_batch]) if mode == "in_memory"
                 else original_batches(self, start_batch, stop_batch))
        return waited(timers, inner)

    cfg = build_config(overrides={**overrides, "train.out": str(run_dir),
                                  "train.online": mode == "online"})
    with harness.patched(
        (BatchStream, "batches", timed_batches),
        (BatchStream, "load", timers.wrap("stream load+decode (prefetch thread)",
                                          BatchStream.load)),
        (labels, "LabelLogits", instruments.timed_label_logits(
            timers, lambda model: "target forward" if model is target else "ref forward")),
        (step.LossModel, "forward", timers.wrap("draft forward + loss", step.LossModel.forward)),
    ), harness.measure() as span:
        train(cfg, progress=False, max_steps=max_steps)
    records = runs.read_metrics(run_dir)
    if runs.checkpoints_dir(run_dir).exists():
        raise SystemExit(f"{mode}: a checkpoint was written inside the timed steps; use a larger "
                         "--limit or fewer steps")
    elapsed = [0.0] + [r["elapsed"] for r in records]
    seconds, calls = timers.take()
    return {
        "mode": mode,
        "step_seconds": [b - a for a, b in zip(elapsed[:-1], elapsed[1:], strict=True)],
        "losses": [r["loss"] for r in records],
        "selected_fraction": [r["selected_fraction"] for r in records],
        "pieces_seconds": seconds,
        "pieces_calls": calls,
        "wall_seconds": span.seconds,
        "others_cores": span.others_cores,
        "loadavg": span.loadavg_after,
    }


# ---------------------------------------------------------------------------------------------
# Peak RSS, one subprocess per configuration


def rss_child(spec: dict) -> int:
    """Run `train` on a cache in this fresh process and print its memory as one JSON line."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    after_imports = rss_mib()
    state = {"peak_before_last_load": 0.0, "reset": False}
    original = models.load_model

    def load_then_reset(*args, **kwargs):
        loaded = original(*args, **kwargs)
        state["peak_before_last_load"] = max(state["peak_before_last_load"], peak_rss_mib())
        state["reset"] = reset_peak_rss()
        state["rss_after_loads"] = rss_mib()
        return loaded

    cfg = build_config(overrides=spec["overrides"])
    started = time.perf_counter()
    with harness.patched((models, "load_model", load_then_reset)):
        run_dir = train(cfg, progress=False, max_steps=spec["steps"])
    records = runs.read_metrics(Path(run_dir))
    steps_peak = peak_rss_mib()
    print(json.dumps({
        "rss_after_imports_mib": after_imports,
        "rss_after_loads_mib": state.get("rss_after_loads"),
        "peak_rss_mib": max(steps_peak, state["peak_before_last_load"]),
        "peak_rss_steps_mib": steps_peak if state["reset"] else None,
        "rss_end_mib": rss_mib(),
        "steps": len(records),
        "checkpoint_written": runs.checkpoints_dir(Path(run_dir)).exists(),
        "seconds": time.perf_counter() - started,
    }))
    return 0


def measure_rss(overrides: dict, steps: int, threads: int | None) -> dict:
    spec = {"overrides": overrides, "steps": steps, "threads": threads}
    done = subprocess.run([sys.executable, "-m", "bench.train_step", "--rss-child",
                           json.dumps(spec)], capture_output=True, text=True, cwd=harness.REPO)
    if done.returncode != 0:
        raise SystemExit(f"RSS subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The steps of the run


def parse_args(argv: list[str] | None):
    p = harness.parser("train_step", __doc__, rounds=3)
    p.add_argument("--target", default="smollm2-135m", help="target spec (alias, dir, gguf)")
    p.add_argument("--draft", default="smollm2-135m@layers=2",
                   help="draft spec, also the (untrained) reference")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=16, help="task rows in the 1x cache")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--k", type=float, default=0.4, help="AdaSPEC fraction of tokens kept")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--scales", default="1,10,100",
                   help="data sizes for peak RSS, multiples of --limit (1 first)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--rss-steps", type=int, default=3, help="steps of each RSS subprocess")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Loaded:
    """The target and the draft initialisation, loaded once; the draft saved to `draft_dir`."""

    def __init__(self, args, work: Path):
        start = time.perf_counter()
        dtype = models.resolve_dtype("auto", torch.device("cpu"))
        self.target, self.tokenizer = models.load_model(args.target, dtype=dtype)
        self.target_load = time.perf_counter() - start
        draft_spec = models.parse_model_spec(args.draft)
        if draft_spec.source == args.target and draft_spec.layers is not None:
            self.draft = models.keep_first_layers(copy.deepcopy(self.target), draft_spec.layers)
        else:
            self.draft, _ = models.load_model(args.draft, dtype=dtype)
        self.draft_dir = work / "draft"  # the draft and reference spec of every run
        models.save_model(self.draft, self.tokenizer, self.draft_dir)
        self.draft_params = sum(p.numel() for p in self.draft.parameters())
        self.target_spec = args.target
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        print(f"target {args.target} loaded in {self.target_load:.1f} s; draft {args.draft}: "
              f"{self.draft_params / 1e6:.1f}M parameters")

    def serve(self, spec: str) -> tuple:
        """`models.load_model` hands back the loaded target, or a fresh copy of the draft."""
        if spec == self.target_spec:
            return self.target, self.tokenizer
        return copy.deepcopy(self.draft), self.tokenizer


def make_caches(args, base: dict, loaded: Loaded, work: Path, scales: list[int]) -> dict:
    """The 1x cache built for real, the larger ones by replication; their facts and times."""
    caches = {1: work / "cache-1x"}
    start = time.perf_counter()
    with harness.patched(harness.serving_models(loaded.serve)):
        cfg = build_config(overrides={**base, "cache.cache": str(caches[1])})
        build.build_stage(cfg, "target", progress=False)
        target_build = time.perf_counter() - start
        build.build_stage(cfg, "ref", model_spec=str(loaded.draft_dir), progress=False)
    build_seconds = time.perf_counter() - start
    for scale in scales[1:]:
        caches[scale] = work / f"cache-{scale}x"
        replicate_cache(caches[1], caches[scale], args.task, args.split, scale)
    facts = {s: cache_facts(c, args.task, args.split) for s, c in caches.items()}
    print(f"1x cache built in {build_seconds:.1f} s (target stage {target_build:.1f} s): "
          f"{facts[1]['sequences']} sequences, {facts[1]['tokens']} tokens, "
          f"{facts[1]['label_tokens']} label rows; larger sizes by replication: {scales[1:]}")
    return {"paths": caches, "facts": facts, "build_seconds": build_seconds,
            "target_build_seconds": target_build}


def stream_of(cache: Path, args, pad_id: int, **kwargs) -> BatchStream:
    reader = store.CacheReader(str(cache), args.task, args.split)
    return BatchStream(reader, args.batch_size, 0, pad_id, **kwargs)


def timed_rounds(args, timing: dict, loaded: Loaded, work: Path, max_steps: int,
                 batches: list) -> list[dict]:
    """(a), (b), (c) per round, the order rotated; one run record each."""

    def run(mode):
        def go(rnd):
            got = timed_run(mode, timing, work / f"run-{mode}-{rnd}", max_steps, batches,
                            loaded.target)
            timed = got["step_seconds"][args.warmup:]
            print(f"round {rnd} {mode:9s}: {statistics.median(timed):.3f} s/step median, "
                  f"first loss {got['losses'][0]:.4f}, other processes' cores "
                  f"{got['others_cores']:.2f}")
            return got
        return go

    with harness.patched(harness.serving_models(loaded.serve)):
        rounds = harness.alternate({mode: run(mode) for mode in MODES}, args.rounds)
    return [{**entry[mode], "round": entry["round"]} for entry in rounds
            for mode in entry["order"]]


def summarize(args, runs: list[dict], batches: list) -> dict:
    """Per mode, timed steps over all rounds; ratios per round on identical batches."""
    tokens = [b.n_tokens for b in batches][args.warmup:]
    label_rows = [b.n_labels for b in batches][args.warmup:]
    summary: dict = {"modes": {}, "ratios": {}}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        steps = [s for r in mine for s in r["step_seconds"][args.warmup:]]
        totals = [sum(r["step_seconds"][args.warmup:]) for r in mine]
        summary["modes"][mode] = {
            "median_step_seconds": statistics.median(steps),
            "tokens_per_s": sum(tokens) / statistics.median(totals),
            "label_rows_per_s": sum(label_rows) / statistics.median(totals),
            # One call per batch each (grad_accum 1); the prefetch thread also reads a few
            # batches ahead that are never used, hence per call rather than per step.
            "pieces_ms_per_call": {
                name: 1e3 * statistics.median(r["pieces_seconds"][name] / r["pieces_calls"][name]
                                              for r in mine)
                for name in sorted({n for r in mine for n in r["pieces_seconds"]})},
        }

    def total(rnd: int, mode: str) -> float:
        run = next(r for r in runs if r["round"] == rnd and r["mode"] == mode)
        return sum(run["step_seconds"][args.warmup:])

    for name, (num, den) in {"cached/in_memory": ("cached", "in_memory"),
                             "online/cached": ("online", "cached")}.items():
        values = [total(rnd, num) / total(rnd, den) for rnd in range(args.rounds)]
        summary["ratios"][name] = {"median": statistics.median(values), "per_round": values}
    losses = {m: [r["losses"] for r in runs if r["mode"] == m] for m in MODES}
    summary["cached_equals_in_memory_losses"] = all(
        x == losses["cached"][0] for x in losses["cached"] + losses["in_memory"])
    return summary


def peak_rss(args, base: dict, caches: dict, pad_id: int, work: Path) -> tuple[dict, int]:
    """Fresh processes, the same number of steps at every data size, and one online run.

    The epoch's permutation differs with the data size, so each size's first batches differ:
    their largest label-row count (the loss's (N, V) tensors) is recorded beside each peak.
    """
    paths, facts = caches["paths"], caches["facts"]
    rss_steps = min(args.rss_steps, stream_of(paths[1], args, pad_id).batches_per_epoch - 1)
    if rss_steps < 1:
        raise SystemExit(f"the 1x cache has {facts[1]['sequences']} sequences, too few for a step "
                         f"before its epoch ends at --batch-size {args.batch_size}; raise --limit")
    largest = {scale: max(b.n_labels for b in stream_of(path, args, pad_id).batches(0, rss_steps))
               for scale, path in paths.items()}
    rss = {}
    for scale, path in paths.items():
        rss[f"cached {scale}x"] = measure_rss(
            {**base, "cache.cache": str(path), "train.out": str(work / f"rss-{scale}")},
            rss_steps, args.threads)
        rss[f"cached {scale}x"]["largest_batch_label_rows"] = largest[scale]
        print(f"peak RSS cached {scale}x: {rss[f'cached {scale}x']['peak_rss_mib']:.0f} MiB")
    rss["online 1x"] = measure_rss(
        {**base, "cache.cache": str(paths[1]), "train.online": True,
         "train.out": str(work / "rss-online")}, rss_steps, args.threads)
    rss["online 1x"]["largest_batch_label_rows"] = largest[1]
    one = rss["cached 1x"]
    for entry in rss.values():
        if entry["checkpoint_written"]:
            raise SystemExit("an RSS run wrote a checkpoint; its peak is not comparable")
        entry["peak_vs_cached_1x"] = entry["peak_rss_mib"] / one["peak_rss_mib"]
        if entry["peak_rss_steps_mib"] is not None:
            entry["steps_peak_vs_cached_1x"] = (entry["peak_rss_steps_mib"]
                                                / one["peak_rss_steps_mib"])
    return rss, rss_steps


def print_tables(summary: dict, rss: dict, facts: dict) -> None:
    sm = summary["modes"]
    rows = [[MODES[m], sm[m]["median_step_seconds"], sm[m]["tokens_per_s"],
             sm[m]["median_step_seconds"] / sm["cached"]["median_step_seconds"]] for m in MODES]
    print()
    print(harness.format_table(["configuration (median over rounds)", "s/step", "tokens/s",
                                "vs (a)"], rows))
    for name, ratio in summary["ratios"].items():
        spread = ", ".join(f"{v:.3f}" for v in ratio["per_round"])
        print(f"{name:17s} time ratio on identical batches: {ratio['median']:.3f} "
              f"(per round: {spread})")
    print(f"(a) and (b) losses identical step by step: "
          f"{summary['cached_equals_in_memory_losses']}")
    pieces = sorted({n for m in MODES for n in sm[m]["pieces_ms_per_call"]})
    print()
    print(harness.format_table(["ms per batch (warm-up included)", "(a)", "(b)", "(c)"],
                               [[n] + [sm[m]["pieces_ms_per_call"].get(n, "") for m in MODES]
                                for n in pieces]))
    print()
    rss_rows = []
    for name, entry in rss.items():
        f = facts[int(name.split()[1].rstrip("x"))]
        rss_rows.append([name, f["sequences"], f["label_tokens"], f["disk_bytes"] / 2**20,
                         f["decoded_bytes"] / 2**20, entry["largest_batch_label_rows"],
                         entry["peak_rss_mib"], entry["peak_rss_steps_mib"] or "n/a",
                         entry["peak_vs_cached_1x"]])
    print(harness.format_table(["peak RSS (own process)", "sequences", "label rows", "cache MiB",
                                "decoded MiB", "max rows/batch", "peak MiB", "peak, steps",
                                "peak vs 1x"], rss_rows))


WHAT = {
    "cached": "train() reading the cache through BatchStream (prefetch thread): draft forward, "
              "sparse loss, AdaSPEC selection, backward, clip, AdamW",
    "in_memory": "the same loop, BatchStream.batches replaced by the same batches read and "
                 "decoded beforehand",
    "online": "train(online=True): target and reference forwards, dense losses, then the same "
              "draft step; sequences and batch order from the same cache",
    "step_seconds": "differences of consecutive `elapsed` in metrics.jsonl",
    "tokens": "real (unpadded) tokens of the timed steps' batches",
    "ratios": "total time of the timed steps of one round / the other mode's, same batches; "
              "median over rounds",
    "peak_rss": "VmHWM of a fresh process running train() for rss_steps steps; 'steps' = after "
                "the last model load (reset via /proc/self/clear_refs)",
    "scales": "1x is a real build; Sx repeats its sequences and stored rows S times",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child is not None:
        return rss_child(json.loads(args.rss_child))
    info = harness.start(args)
    scales = [int(s) for s in args.scales.split(",")]
    if scales[0] != 1:
        raise SystemExit(f"--scales must start with 1, got {args.scales}")
    tmp = tempfile.TemporaryDirectory(prefix="bench-train-step-")
    work = Path(tmp.name)
    loaded = Loaded(args, work)
    base = {
        "models.target": args.target, "models.draft": str(loaded.draft_dir),
        "models.ref": str(loaded.draft_dir), "data.task": args.task, "data.split": args.split,
        "data.data_files": args.data_files or None, "data.limit": args.limit,
        "data.max_length": args.max_length, "cache.topk": args.topk, "train.k": args.k,
        "cache.sparse": "topk", "cache.value_encoding": "float16",
        "train.batch_size": args.batch_size,
    }
    caches = make_caches(args, base, loaded, work, scales)

    # The timed runs read the largest cache, so that their steps stay inside its first epoch.
    timing_cache = caches["paths"][scales[-1]]
    max_steps = args.warmup + args.steps
    stream = stream_of(timing_cache, args, loaded.pad_id, with_target=True, ref=("ref", "fkl"))
    if max_steps >= stream.batches_per_epoch:
        raise SystemExit(f"{max_steps} steps would reach the end of the epoch "
                         f"({stream.batches_per_epoch} batches); use fewer --steps or more data")
    batches = list(stream.batches(0, max_steps))
    runs = timed_rounds(args, {**base, "cache.cache": str(timing_cache)}, loaded, work,
                        max_steps, batches)
    summary = summarize(args, runs, batches)
    rss, rss_steps = peak_rss(args, base, caches, loaded.pad_id, work)
    tmp.cleanup()
    print_tables(summary, rss, caches["facts"])
    harness.write_json(args.out, {
        "benchmark": "train_step",
        "what": WHAT,
        "machine": info,
        "settings": {**vars(args), "draft_parameters": loaded.draft_params,
                     "timing_scale": scales[-1], "rss_steps": rss_steps, "config": base},
        "target_load_seconds": loaded.target_load,
        "build_seconds": caches["build_seconds"],
        "target_build_seconds": caches["target_build_seconds"],
        "caches": {f"{s}x": f for s, f in caches["facts"].items()},
        "batches": {"tokens": [b.n_tokens for b in batches],
                    "label_rows": [b.n_labels for b in batches]},
        "summary": summary,
        "peak_rss": rss,
        "runs": runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
