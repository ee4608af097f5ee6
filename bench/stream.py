"""Can the cache feed a GPU? Label tokens per second of the batch stream, and one step's time.

For each cache (default: the default sampled cache, 8 draws uint8q, and top-64 float16, both
built here from the same rows with the embedded target unless `--cache` names existing ones):

- baseline: one bulk decoded read of the whole split's rows (`CacheReader.target_rows(0, N)`
  and the reference losses), measured in the same run;
- the stream (`BatchStream`, shuffled batches of `--batch-size` sequences, target rows and,
  when the cache has them, reference losses): warm (files in the page cache) and cold (page
  cache dropped with posix_fadvise first), and each process's share under 2 processes;
- against the rate a GPU draft would consume (`--gpu-rate`, default 1M label tokens/s): the
  ratio, and the fraction of a GPU step that would wait on data if the stream were the only
  producer (prefetching hides the rest).

Object store (unless `--no-object-store`): the first cache copied into a bucket of a local S3
server (moto's, on 127.0.0.1, the test suite's server: no network in the way, so this is the
client's and the format's cost, a floor for a real store), then the stream read from
`s3://...` cold (empty local shard cache), warm (the local shard cache filled by the cold pass)
and without a local cache, beside the local warm rate; with the local cache's hit rate
(requests served from local files) and bytes fetched.

Then one training step of a draft, in this process, split into wait-for-batch / host->device /
forward (+ selection and reduction) / backward / optimizer (synchronised at each boundary on
CUDA), over `--steps` steps after `--warmup` untimed ones.

    python -m bench.stream                                     # 100 gsm8k rows, both caches
    python -m bench.stream --cache DIR --task arith --draft DIR --device cuda   # gpu_check
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import harness
from adaspec import models, selection, step
from adaspec.build import build_stage
from adaspec.config import build_config
from adaspec.stream import BatchStream
from bench import instruments
from cache_tools.store import CacheReader

CACHES = {
    "default": {},  # CacheConfig's defaults: 8 draws, uint8q, delta ids
    "topk64-float16": {"sparse": "topk", "topk": 64, "value_encoding": "float16"},
}


def _drop_page_cache(root: Path) -> None:
    """Ask the kernel to forget the cache's file pages (a cold read)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _ref(reader: CacheReader) -> tuple[str, str] | None:
    names = reader.ref_names()
    return (names[0], "fkl") if names else None


def bulk_rate(reader: CacheReader) -> dict:
    """Rows/s of one decoded read of every target row (and reference loss)."""
    ref = _ref(reader)
    start = time.perf_counter()
    rows = reader.target_rows(0, reader.n_label_rows)
    if ref is not None:
        reader.ref_losses(*ref, 0, reader.n_label_rows)
    seconds = time.perf_counter() - start
    return {"rows": len(rows["ids"]), "seconds": seconds,
            "rows_per_s": len(rows["ids"]) / seconds}


def stream_rate(root: str, task: str, split: str, batch_size: int, batches: int,
                rank: int = 0, world: int = 1, cold: bool = False,
                local_cache: tuple[str, int] | None = None) -> dict:
    """Label rows/s of a fresh reader and stream over `batches` batches (this process's share);
    a remote root is read through `local_cache` (folder, bytes) when given."""
    if cold and "://" not in root:
        _drop_page_cache(Path(root))
    start = time.perf_counter()
    reader = CacheReader(root, task, split, local_cache=local_cache)
    stream = BatchStream(reader, batch_size, 0, 0, with_target=True, ref=_ref(reader),
                         rank=rank, world_size=world)
    rows = 0
    for batch in stream.batches(0, batches):
        rows += batch.n_labels
    seconds = time.perf_counter() - start
    out = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
           "batches": batches, "whole_split_in_memory": stream.blocks.whole}
    stats = getattr(reader.group.store, "stats", None)  # a LocalShardCache's counters
    if stats is not None:
        requests = stats["hits"] + stats["misses"]
        out["local_cache"] = {**stats, "hit_rate": stats["hits"] / max(requests, 1)}
    return out


def object_store_rates(root: str, task: str, split: str, args, local_warm: float) -> dict:
    """The stream from a copy of `root` in a local S3 server's bucket: cold and warm local
    shard cache, and no local cache; with the local warm rate measured beside it."""
    import s3fs

    with instruments.local_s3_server("adaspec-bench"):
        s3fs.S3FileSystem(skip_instance_cache=True).put(root, "adaspec-bench/cache",
                                                        recursive=True)
        remote = "s3://adaspec-bench/cache"
        per_epoch = -(-CacheReader(root, task, split).n_sequences // args.batch_size)
        n = min(args.batches, per_epoch * 20)
        with tempfile.TemporaryDirectory() as shards:
            local_cache = (shards, args.local_cache_mb * 2**20)
            cold = stream_rate(remote, task, split, args.batch_size, n, local_cache=local_cache)
            warm = stream_rate(remote, task, split, args.batch_size, n, local_cache=local_cache)
        direct = stream_rate(remote, task, split, args.batch_size, n)
    return {"server": "moto (local, 127.0.0.1)", "local_cache_mb": args.local_cache_mb,
            "cold": cold, "warm": warm, "no_local_cache": direct,
            "local_warm_rows_per_s": local_warm,
            "cold_over_local": cold["rows_per_s"] / local_warm,
            "warm_over_local": warm["rows_per_s"] / local_warm,
            "no_local_cache_over_local": direct["rows_per_s"] / local_warm}


def step_split(root: str, task: str, split: str, draft: str, device: torch.device,
               batch_size: int, steps: int, warmup: int) -> dict:
    """One draft training step split into its parts (seconds per step, medians)."""
    reader = CacheReader(root, task, split)
    ref = _ref(reader)
    model, tokenizer = models.load_model(draft, dtype=torch.float32)
    model.to(device).train()
    loss_model = step.LossModel(model, reader.vocab_size, "fkl", 0.5, 1024)
    optimizer = torch.optim.AdamW(step.param_groups(model, 0.1), lr=1e-4)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    teacher = step.CachedTeacher()
    stream = BatchStream(reader, batch_size, 1, models.pad_id(tokenizer), with_target=True,
                         ref=ref)
    batches = stream.batches(0, steps + warmup)
    parts: dict[str, list[float]] = {k: [] for k in ("wait", "h2d", "forward", "backward",
                                                     "optimizer")}
    tokens = []

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    try:
        for i in range(steps + warmup):
            t0 = now()
            host = next(batches)
            t1 = now()
            batch = host.to(device, non_blocking=True)
            lesson = teacher(batch, device)
            t2 = now()
            with autocast:
                per_token, _ = loss_model(batch, target=lesson.target)
            keep = selection.select("adaspec", 0.4 if ref else 1.0, per_token, lesson.ref_loss)
            loss = selection.reduce_loss(per_token, keep, float(host.n_labels))
            t3 = now()
            loss.backward()
            t4 = now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t5 = now()
            if i >= warmup:
                for name, (a, b) in zip(parts, [(t0, t1), (t1, t2), (t2, t3), (t3, t4),
                                                (t4, t5)], strict=True):
                    parts[name].append(b - a)
                tokens.append(host.n_labels)
    finally:
        batches.close()
    median = {name: statistics.median(v) for name, v in parts.items()}
    total = sum(median.values())
    out = {"device": str(device), "draft": draft, "steps": steps, "batch_size": batch_size,
           "seconds_per_step": median, "step_seconds": total,
           "label_tokens_per_step": statistics.median(tokens),
           "label_tokens_per_s": statistics.median(tokens) / total,
           "share_waiting_on_data": median["wait"] / total}
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def build_caches(work: Path, target: str, data_files: str, limit: int) -> dict[str, str]:
    """The two caches of the same rows (the target's forward runs once per cache)."""
    roots = {}
    for name, values in CACHES.items():
        root = work / name
        cfg = build_config({
            "models": {"target": target},
            "data": {"task": "gsm8k", "data_files": data_files, "limit": limit},
            "cache": {"cache": str(root), **values},
        })
        build_stage(cfg, "target", progress=False)
        roots[name] = str(root)
    return roots


def measure_cache(root: str, task: str, split: str, args) -> dict:
    reader = CacheReader(root, task, split)
    bulk = bulk_rate(reader)
    per_epoch = -(-reader.n_sequences // args.batch_size)
    n = min(args.batches, per_epoch * 20)
    warm = [stream_rate(root, task, split, args.batch_size, n) for _ in range(args.rounds)]
    cold = stream_rate(root, task, split, args.batch_size, n, cold=True)
    two = reader.n_sequences >= 2 * args.batch_size  # each process needs a batch an epoch
    shares = [stream_rate(root, task, split, args.batch_size, max(1, n // 2), rank=r, world=2)
              for r in range(2)] if two else []
    best = statistics.median([w["rows_per_s"] for w in warm])
    return {
        "label_rows": reader.n_label_rows, "sequences": reader.n_sequences,
        "target": reader.target_params.get("mode"), "k": reader.target_params.get("k"),
        "value_encoding": reader.target_params.get("value_encoding"),
        "with_ref_losses": _ref(reader) is not None,
        "bulk": bulk, "warm": warm, "cold": cold, "two_process_shares": shares,
        "warm_rows_per_s": best,
        "stream_over_bulk": best / bulk["rows_per_s"],
        "stream_over_gpu_rate": best / args.gpu_rate,
        "cold_over_gpu_rate": cold["rows_per_s"] / args.gpu_rate,
        "gpu_wait_fraction": max(0.0, 1.0 - best / args.gpu_rate),
    }


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("stream", __doc__, rounds=3)
    p.add_argument("--cache", nargs="*", default=None,
                   help="existing cache root(s) to measure instead of building the two")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--split", default="train")
    p.add_argument("--target", default="smollm2-135m", help="target of the built caches")
    p.add_argument("--limit", type=int, default=100, help="rows of the built caches")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=400, help="batches per stream measure")
    p.add_argument("--gpu-rate", type=float, default=1e6,
                   help="label tokens/s a GPU draft consumes (default 1M)")
    p.add_argument("--draft", default="smollm2-135m@layers=2", help="draft of the step split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps of the step split")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--step-batch-size", type=int, default=4)
    p.add_argument("--no-object-store", action="store_true",
                   help="skip the stream from a local S3 server")
    p.add_argument("--local-cache-mb", type=int, default=256,
                   help="local shard cache of the object-store measure")
    args = p.parse_args(argv)
    machine = harness.start(args)
    with tempfile.TemporaryDirectory() as tmp:
        roots = ({Path(r).name: r for r in args.cache} if args.cache
                 else build_caches(Path(tmp), args.target, args.data_files, args.limit))
        caches = {name: measure_cache(root, args.task, args.split, args)
                  for name, root in roots.items()}
        first = next(iter(roots.values()))
        remote = None if args.no_object_store else object_store_rates(
            first, args.task, args.split, args, next(iter(caches.values()))["warm_rows_per_s"])
        split = step_split(first, args.task, args.split, args.draft, torch.device(args.device),
                           args.step_batch_size, args.steps, args.warmup)
    rows = [[name, c["label_rows"], c["bulk"]["rows_per_s"], c["warm_rows_per_s"],
             c["cold"]["rows_per_s"],
             min((s["rows_per_s"] for s in c["two_process_shares"]), default=float("nan")),
             c["stream_over_bulk"], c["stream_over_gpu_rate"], c["gpu_wait_fraction"]]
            for name, c in caches.items()]
    print(harness.format_table(
        ["cache", "rows", "bulk rows/s", "stream warm", "cold", "2-proc share", "stream/bulk",
         f"stream/GPU {args.gpu_rate:.0e}", "GPU wait"], rows))
    if remote is not None:
        print(harness.format_table(
            [f"{next(iter(roots))} from S3 (moto, local)", "rows/s", "vs local warm",
             "local-cache hit rate", "MB fetched"],
            [[name, r["rows_per_s"], r["rows_per_s"] / remote["local_warm_rows_per_s"],
              r.get("local_cache", {}).get("hit_rate", float("nan")),
              r.get("local_cache", {}).get("bytes_fetched", float("nan")) / 2**20]
             for name, r in (("cold local cache", remote["cold"]),
                             ("warm local cache", remote["warm"]),
                             ("no local cache", remote["no_local_cache"]))]))
    s = split["seconds_per_step"]
    print(harness.format_table(
        ["step on " + split["device"], "wait", "h2d", "forward", "backward", "optimizer",
         "total", "tokens/s", "wait share"],
        [[args.draft, s["wait"], s["h2d"], s["forward"], s["backward"], s["optimizer"],
          split["step_seconds"], split["label_tokens_per_s"], split["share_waiting_on_data"]]]))
    harness.write_json(args.out, {"benchmark": "stream", "machine": machine,
                                  "settings": vars(args), "caches": caches,
                                  "object_store": remote, "step_split": split})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
