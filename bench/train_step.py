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
stay within the first epoch, so no checkpoint is written inside them.

Peak RSS: a cached run of `--rss-steps` steps (the plain `train`, models loaded from disk) in a
fresh subprocess per data size, so peaks do not mix; and one online run at 1x for comparison.
"peak, steps" is the high-water mark after the last model load (reset through
/proc/self/clear_refs), i.e. the training itself.

Data: `--limit` task rows are built into a real cache (`build_stage`: the target stage with the
target, the ref stage with the untrained draft as reference: only the timing matters here). The
larger sizes (`--scales`) repeat that cache's sequences and stored rows S times, written through
`store.write_sequences` and `StageWriter` (same encoding, chunks and shards), which costs no model
time and makes the sizes differ in nothing but size. The timed runs use the largest cache.

    .venv/bin/python bench/train_step.py                   # ~16 min with other jobs on 1 core
    .venv/bin/python bench/train_step.py --steps 8 --rounds 3
    .venv/bin/python bench/train_step.py --target /tmp/tiny --draft /tmp/tiny@layers=1 \\
        --limit 16 --topk 16 --batch-size 2 --steps 2 --rounds 1 --scales 1,10   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_build import (  # noqa: E402
    DEFAULT_DATA,
    RESULTS,
    OtherLoad,
    format_table,
    machine_info,
    write_json,
)

MODES = {
    "cached": "(a) cached: BatchStream -> draft step",
    "in_memory": "(b) in-memory batches -> draft step",
    "online": "(c) online: target + ref live -> draft step",
}


# ---------------------------------------------------------------------------------------------
# Memory of the current process (Linux /proc)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """High-water RSS since the process started or since the last `reset_peak_rss`."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Caches


def replicate_cache(src: Path, dst: Path, task: str, split: str, times: int) -> dict:
    """Write `src`'s split into `dst` with every sequence and stored row repeated `times` times.

    The stored (encoded) arrays are copied as they are, through the same writer and with the same
    shard and chunk shapes, so only the size differs. The manifest notes the replication.
    """
    from cache_tools import schema, store

    src_group = store.open_root(str(src), mode="r")[store.split_path(task, split)]
    manifest = store.read_manifest(src_group)
    seq = src_group[schema.SEQUENCES]
    offsets = seq["offsets"][:]
    ids, mask = seq["input_ids"][:].astype(np.int64), seq["label_mask"][:].astype(bool)
    spans = list(zip(offsets[:-1], offsets[1:], strict=True))
    group = store.open_root(str(dst), mode="a").require_group(task).require_group(split)
    counts = store.write_sequences(
        group, [ids[a:b] for a, b in spans] * times, [mask[a:b] for a, b in spans] * times,
        np.tile(seq["source_index"][:], times), manifest["vocab_size"])
    manifest["stages"][schema.SEQUENCES]["counts"] = counts
    for stage, entry in manifest["stages"].items():
        if stage == schema.SEQUENCES:
            continue
        stage_group = src_group[stage]
        names = sorted(n for n in stage_group.array_keys() if n != schema.DONE)
        stored = {n: stage_group[n] for n in names}
        arrays = {n: store.RowArray(a.dtype, a.shape[1] if a.ndim == 2 else None, a.fill_value)
                  for n, a in stored.items()}
        values = {n: np.concatenate([a[:]] * times) for n, a in stored.items()}
        first = stored[names[0]]
        writer = store.StageWriter(group, stage, counts["label_tokens"], arrays,
                                   first.shards[0], first.chunks[0])
        for shard in writer.pending_shards():
            a, b = writer.shard_range(shard)
            writer.write_shard(shard, {n: v[a:b] for n, v in values.items()})
        entry["counts"] = {"label_tokens": counts["label_tokens"], "shards": writer.n_shards}
    manifest["replicated"] = {"from": str(src), "times": times}
    store.write_manifest(group, manifest)
    return manifest


def cache_facts(root: Path, task: str, split: str) -> dict:
    """Sequences, tokens, label rows, bytes on disk and bytes of every row decoded in memory."""
    from cache_tools import schema, store

    group = store.open_root(str(root), mode="r")[store.split_path(task, split)]
    manifest = store.read_manifest(group)
    counts = manifest["stages"][schema.SEQUENCES]["counts"]
    k = manifest["stages"][schema.TARGET]["params"]["k"]
    # CacheReader decodes ids to int64 and values to float32; tail and 4 ref losses float32.
    decoded = counts["label_tokens"] * (k * (8 + 4) + 4 + 4 * len(schema.DIVERGENCES))
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {**counts, "k": k, "disk_bytes": disk, "decoded_bytes": decoded}


# ---------------------------------------------------------------------------------------------
# One timed run of the real loop


@contextlib.contextmanager
def loaded_models(target_spec: str, target, draft_init, tokenizer):
    """`models.load_model` hands back the loaded target, or a fresh copy of the draft."""
    from adaspec import models

    def load_model(spec, dtype=torch.float32, device_map=None):
        if spec == target_spec:
            return target, tokenizer
        return copy.deepcopy(draft_init), tokenizer

    with mock.patch.object(models, "load_model", load_model):
        yield


def timed_run(mode: str, overrides: dict, run_dir: Path, max_steps: int, batches: list,
              target) -> dict:
    """`train(cfg, max_steps)` in `mode`; per-step seconds and losses from its metrics.jsonl,
    and the pieces of a step timed by wrapping what the loop calls."""
    from adaspec import train as train_mod
    from adaspec.config import build_config
    from adaspec.stream import BatchStream

    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    original_batches, original_load = BatchStream.batches, BatchStream.load
    original_label_logits, original_forward = train_mod._label_logits, train_mod.LossModel.forward

    def add(name, start):
        seconds[name] += time.perf_counter() - start
        calls[name] += 1

    def timed_batches(self, start_batch=0, stop_batch=None):
        # (b) serves the batches decoded beforehand; every mode times the loop's wait for one.
        inner = (iter(batches[start_batch:stop_batch]) if mode == "in_memory"
                 else original_batches(self, start_batch, stop_batch))

        def waited():
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        batch = next(inner)
                    except StopIteration:
                        return
                    add("wait for the next batch", start)
                    yield batch
            finally:
                if hasattr(inner, "close"):
                    inner.close()

        return waited()

    def timed_load(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_load(self, *args, **kwargs)
        finally:
            add("stream load+decode (prefetch thread)", start)

    def timed_label_logits(model, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_label_logits(model, *args, **kwargs)
        finally:
            add("target forward" if model is target else "ref forward", start)

    def timed_forward(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            add("draft forward + loss", start)

    cfg = build_config(overrides={**overrides, "train.out": str(run_dir),
                                  "train.online": mode == "online"})
    others = OtherLoad()
    others.start()
    started = time.perf_counter()
    with mock.patch.object(BatchStream, "batches", timed_batches), \
            mock.patch.object(BatchStream, "load", timed_load), \
            mock.patch.object(train_mod, "_label_logits", timed_label_logits), \
            mock.patch.object(train_mod.LossModel, "forward", timed_forward):
        train_mod.train(cfg, progress=False, max_steps=max_steps)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if (run_dir / "checkpoints").exists():
        raise SystemExit(f"{mode}: a checkpoint was written inside the timed steps; use a larger "
                         "--limit or fewer steps")
    elapsed = [0.0] + [r["elapsed"] for r in records]
    return {
        "mode": mode,
        "step_seconds": [b - a for a, b in zip(elapsed[:-1], elapsed[1:], strict=True)],
        "losses": [r["loss"] for r in records],
        "selected_fraction": [r["selected_fraction"] for r in records],
        "pieces_seconds": dict(seconds),
        "pieces_calls": dict(calls),
        "wall_seconds": wall,
        "others_cores": others.stop() / wall,
    }


# ---------------------------------------------------------------------------------------------
# Peak RSS, one subprocess per configuration


def rss_child(spec: dict) -> int:
    """Run `train` on a cache in this fresh process and print its memory as one JSON line."""
    from adaspec import models
    from adaspec.config import build_config
    from adaspec.train import train

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
    with mock.patch.object(models, "load_model", load_then_reset):
        run_dir = train(cfg, progress=False, max_steps=spec["steps"])
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps_peak = peak_rss_mib()
    print(json.dumps({
        "rss_after_imports_mib": after_imports,
        "rss_after_loads_mib": state.get("rss_after_loads"),
        "peak_rss_mib": max(steps_peak, state["peak_before_last_load"]),
        "peak_rss_steps_mib": steps_peak if state["reset"] else None,
        "rss_end_mib": rss_mib(),
        "steps": len(records),
        "checkpoint_written": (Path(run_dir) / "checkpoints").exists(),
        "seconds": time.perf_counter() - started,
    }))
    return 0


def measure_rss(overrides: dict, steps: int) -> dict:
    spec = {"overrides": overrides, "steps": steps}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child",
                           json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"RSS subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m", help="target spec (alias, dir, gguf)")
    parser.add_argument("--draft", default="smollm2-135m@layers=2",
                        help="draft spec, also the (untrained) reference")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-files", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=16, help="task rows in the 1x cache")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--k", type=float, default=0.4, help="AdaSPEC fraction of tokens kept")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--scales", default="1,10,100",
                        help="data sizes for peak RSS, multiples of --limit (1 first)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of (a), (b), (c), rotated")
    parser.add_argument("--rss-steps", type=int, default=3, help="steps of each RSS subprocess")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "train_step.json"))
    args = parser.parse_args(argv)
    if args.rss_child is not None:
        return rss_child(json.loads(args.rss_child))

    from adaspec import models
    from adaspec.build import build_stage, resolve_dtype
    from adaspec.config import build_config
    from adaspec.stream import BatchStream
    from cache_tools.store import CacheReader

    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [int(s) for s in args.scales.split(",")]
    if scales[0] != 1:
        raise SystemExit(f"--scales must start with 1, got {args.scales}")
    info = machine_info()
    tmp = tempfile.TemporaryDirectory(prefix="bench-train-step-")
    work = Path(tmp.name)
    task, split = args.task, args.split

    # Models, loaded once: the draft is cut from the target when it is `<target>@layers=N`.
    start = time.perf_counter()
    dtype = resolve_dtype("auto", torch.device("cpu"))
    target, tokenizer = models.load_model(args.target, dtype=dtype)
    target_load = time.perf_counter() - start
    draft_spec = models.parse_model_spec(args.draft)
    if draft_spec.source == args.target and draft_spec.layers is not None:
        draft_init = models.keep_first_layers(copy.deepcopy(target), draft_spec.layers)
    else:
        draft_init, _ = models.load_model(args.draft, dtype=dtype)
    draft_dir = work / "draft"  # the draft and reference spec of every run; RSS runs load it
    models.save_model(draft_init, tokenizer, draft_dir)
    draft_params = sum(p.numel() for p in draft_init.parameters())
    print(f"target {args.target} loaded in {target_load:.1f} s; draft {args.draft}: "
          f"{draft_params / 1e6:.1f}M parameters")

    base = {
        "models.target": args.target, "models.draft": str(draft_dir),
        "models.ref": str(draft_dir), "data.task": task, "data.split": split,
        "data.data_files": args.data_files, "data.limit": args.limit,
        "data.max_length": args.max_length, "cache.topk": args.topk, "train.k": args.k,
        "cache.sparse": "topk", "cache.value_encoding": "float16",
        "train.batch_size": args.batch_size,
    }
    caches = {1: work / "cache-1x"}
    start = time.perf_counter()
    with loaded_models(args.target, target, draft_init, tokenizer):
        cfg = build_config(overrides={**base, "cache.cache": str(caches[1])})
        build_stage(cfg, "target", progress=False)
        target_build = time.perf_counter() - start
        build_stage(cfg, "ref", model_spec=str(draft_dir), progress=False)
    build_seconds = time.perf_counter() - start
    for scale in scales[1:]:
        caches[scale] = work / f"cache-{scale}x"
        replicate_cache(caches[1], caches[scale], task, split, scale)
    facts = {s: cache_facts(c, task, split) for s, c in caches.items()}
    print(f"1x cache built in {build_seconds:.1f} s (target stage {target_build:.1f} s): "
          f"{facts[1]['sequences']} sequences, {facts[1]['tokens']} tokens, "
          f"{facts[1]['label_tokens']} label rows; larger sizes by replication: {scales[1:]}")

    # The timed runs read the largest cache, so that their steps stay inside its first epoch.
    timing_scale = scales[-1]
    timing = {**base, "cache.cache": str(caches[timing_scale])}
    max_steps = args.warmup + args.steps
    reader = CacheReader(str(caches[timing_scale]), task, split)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = BatchStream(reader, args.batch_size, 0, pad_id, with_target=True, ref=("ref", "fkl"))
    if max_steps >= stream.batches_per_epoch:
        raise SystemExit(f"{max_steps} steps would reach the end of the epoch "
                         f"({stream.batches_per_epoch} batches); use fewer --steps or more data")
    batches = [stream.load(p, stream.batch_indices(p)) for p in range(max_steps)]
    tokens = [b.n_tokens for b in batches]
    label_rows = [b.n_labels for b in batches]

    runs = []
    order = list(MODES)
    with loaded_models(args.target, target, draft_init, tokenizer):
        for rnd in range(args.rounds):
            for mode in order[rnd % 3:] + order[: rnd % 3]:
                run = timed_run(mode, timing, work / f"run-{mode}-{rnd}", max_steps, batches,
                                target)
                run.update(round=rnd, loadavg=os.getloadavg())
                runs.append(run)
                timed = run["step_seconds"][args.warmup:]
                print(f"round {rnd} {mode:9s}: {statistics.median(timed):.3f} s/step median, "
                      f"first loss {run['losses'][0]:.4f}, other processes' cores "
                      f"{run['others_cores']:.2f}")

    # Summary: per mode, timed steps over all rounds; ratios per round on identical batches.
    timed_tokens = sum(tokens[args.warmup:])
    summary: dict = {"modes": {}, "ratios": {}}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        steps = [s for r in mine for s in r["step_seconds"][args.warmup:]]
        totals = [sum(r["step_seconds"][args.warmup:]) for r in mine]
        summary["modes"][mode] = {
            "median_step_seconds": statistics.median(steps),
            "tokens_per_s": timed_tokens / statistics.median(totals),
            "label_rows_per_s": sum(label_rows[args.warmup:]) / statistics.median(totals),
            # One call per batch each (grad_accum 1); the prefetch thread also reads a few
            # batches ahead that are never used, hence per call rather than per step.
            "pieces_ms_per_call": {
                name: 1e3 * statistics.median(r["pieces_seconds"][name] / r["pieces_calls"][name]
                                              for r in mine)
                for name in sorted({n for r in mine for n in r["pieces_seconds"]})},
        }

    def per_round(num: str, den: str) -> list[float]:
        out = []
        for rnd in range(args.rounds):
            a, b = (next(r for r in runs if r["round"] == rnd and r["mode"] == m)
                    for m in (num, den))
            out.append(sum(a["step_seconds"][args.warmup:]) / sum(b["step_seconds"][args.warmup:]))
        return out

    for name, (num, den) in {"cached/in_memory": ("cached", "in_memory"),
                             "online/cached": ("online", "cached")}.items():
        values = per_round(num, den)
        summary["ratios"][name] = {"median": statistics.median(values), "per_round": values}
    losses = {m: [r["losses"] for r in runs if r["mode"] == m] for m in MODES}
    summary["cached_equals_in_memory_losses"] = all(
        x == losses["cached"][0] for x in losses["cached"] + losses["in_memory"])

    # Peak RSS: fresh processes, the same number of steps at every data size.
    # The epoch's permutation differs with the data size, so each size's first batches differ:
    # their largest label-row count (the loss's (N, V) tensors) is recorded beside each peak.
    rss = {}
    rss_steps = min(args.rss_steps, BatchStream(CacheReader(str(caches[1]), task, split),
                                                args.batch_size, 0, pad_id).batches_per_epoch - 1)
    if rss_steps < 1:
        raise SystemExit(f"the 1x cache has {facts[1]['sequences']} sequences, too few for a step "
                         f"before its epoch ends at --batch-size {args.batch_size}; raise --limit")
    largest_batch = {}
    for scale in scales:
        scaled = BatchStream(CacheReader(str(caches[scale]), task, split), args.batch_size, 0,
                             pad_id)
        largest_batch[scale] = max(
            int(sum(scaled.label_offsets[i + 1] - scaled.label_offsets[i]
                    for i in scaled.batch_indices(p)))
            for p in range(rss_steps))
    for scale in scales:
        rss[f"cached {scale}x"] = measure_rss(
            {**base, "cache.cache": str(caches[scale]), "train.out": str(work / f"rss-{scale}")},
            rss_steps)
        rss[f"cached {scale}x"]["largest_batch_label_rows"] = largest_batch[scale]
        print(f"peak RSS cached {scale}x: {rss[f'cached {scale}x']['peak_rss_mib']:.0f} MiB")
    rss["online 1x"] = measure_rss(
        {**base, "cache.cache": str(caches[1]), "train.online": True,
         "train.out": str(work / "rss-online")}, rss_steps)
    rss["online 1x"]["largest_batch_label_rows"] = largest_batch[1]
    for entry in rss.values():
        if entry["checkpoint_written"]:
            raise SystemExit("an RSS run wrote a checkpoint; its peak is not comparable")
    one = rss["cached 1x"]
    for entry in rss.values():
        entry["peak_vs_cached_1x"] = entry["peak_rss_mib"] / one["peak_rss_mib"]
        if entry["peak_rss_steps_mib"] is not None:
            entry["steps_peak_vs_cached_1x"] = (entry["peak_rss_steps_mib"]
                                                / one["peak_rss_steps_mib"])
    tmp.cleanup()

    # Tables.
    sm = summary["modes"]
    rows = [[MODES[m], sm[m]["median_step_seconds"], sm[m]["tokens_per_s"],
             sm[m]["median_step_seconds"] / sm["cached"]["median_step_seconds"]] for m in MODES]
    print()
    print(format_table(["configuration (median over rounds)", "s/step", "tokens/s", "vs (a)"],
                       rows))
    for name, ratio in summary["ratios"].items():
        spread = ", ".join(f"{v:.3f}" for v in ratio["per_round"])
        print(f"{name:17s} time ratio on identical batches: {ratio['median']:.3f} "
              f"(per round: {spread})")
    print(f"(a) and (b) losses identical step by step: "
          f"{summary['cached_equals_in_memory_losses']}")
    pieces = sorted({n for m in MODES for n in sm[m]["pieces_ms_per_call"]})
    print()
    print(format_table(["ms per batch (warm-up included)", "(a)", "(b)", "(c)"],
                       [[n] + [sm[m]["pieces_ms_per_call"].get(n, "") for m in MODES]
                        for n in pieces]))
    print()
    rss_rows = []
    for name, entry in rss.items():
        scale = int(name.split()[1].rstrip("x"))
        f = facts[scale]
        rss_rows.append([name, f["sequences"], f["label_tokens"], f["disk_bytes"] / 2**20,
                         f["decoded_bytes"] / 2**20, entry["largest_batch_label_rows"],
                         entry["peak_rss_mib"], entry["peak_rss_steps_mib"] or "n/a",
                         entry["peak_vs_cached_1x"]])
    print(format_table(["peak RSS (own process)", "sequences", "label rows", "cache MiB",
                        "decoded MiB", "max rows/batch", "peak MiB", "peak, steps",
                        "peak vs 1x"], rss_rows))

    payload = {
        "benchmark": "train_step",
        "what": {
            "cached": "train() reading the cache through BatchStream (prefetch thread): draft "
                      "forward, sparse loss, AdaSPEC selection, backward, clip, AdamW",
            "in_memory": "the same loop, BatchStream.batches replaced by the same batches read "
                         "and decoded beforehand",
            "online": "train(online=True): target and reference forwards, dense losses, then the "
                      "same draft step; sequences and batch order from the same cache",
            "step_seconds": "differences of consecutive `elapsed` in metrics.jsonl",
            "tokens": "real (unpadded) tokens of the timed steps' batches",
            "ratios": "total time of the timed steps of one round / the other mode's, same "
                      "batches; median over rounds",
            "peak_rss": "VmHWM of a fresh process running train() for rss_steps steps; "
                        "'steps' = after the last model load (reset via /proc/self/clear_refs)",
            "scales": "1x is a real build; Sx repeats its sequences and stored rows S times",
        },
        "machine": info,
        "settings": {**vars(args), "draft_parameters": draft_params, "timing_scale": timing_scale,
                     "rss_steps": rss_steps, "config": base},
        "target_load_seconds": target_load,
        "build_seconds": build_seconds,
        "target_build_seconds": target_build,
        "caches": {f"{s}x": f for s, f in facts.items()},
        "batches": {"tokens": tokens, "label_rows": label_rows},
        "summary": summary,
        "peak_rss": rss,
        "runs": runs,
    }
    write_json(Path(args.out), payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
