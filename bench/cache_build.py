"""How close the target cache build runs to the bare model forward, and where the rest goes.

One process, one model load, the same sequences and the same batch plan for both measures:

- bare: for every planned batch, the build's own forward path and nothing else:
  `labels.LabelLogits` over the padded batch (`labels.pad_batch`: the trunk once, then the
  vocabulary head on the label rows only, in blocks of `build.LOGIT_ROWS`) and `cut_logits`.
  `--plain-forward` also times `model(...).logits` (the head on every position), for reference.
- build: `build_stage(cfg, "target")` into a fresh temporary folder, progress bar off. The model
  is not loaded again: `models.load_model` is patched to hand back the loaded one, and the one
  real load is reported on its own, outside every tokens/s figure.

Rounds alternate the order (bare, build / build, bare, ...) so a drift of the machine's load hits
both sides. The build's pieces are timed by wrapping the public functions it calls (setup:
reading and tokenising the task, writing the sequences, hashing the model file; per batch: the
trunk (`LabelLogits` built), the head (`LabelLogits` called), top-K (`sparse.topk_rows`), the
whole batch (`build.target_batch_fn`'s compute); the shard encodes and writes (`StageWriter.encode`,
`StageWriter.write_stored_shard`), which run in the writer thread and overlap the next shard's
compute). tokens/s counts real (unpadded) tokens run
through the model. Commands: bench/README.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import harness
from adaspec import build, labels, models, sparse, tasks
from adaspec.config import build_config
from cache_tools import schema, store

TOPK_PIECE = "top-K (log_softmax+topk+tail)"
LOOP_PIECE = "shard loop (open_stage -> finish)"
IN_COMPUTE = ("forward (trunk)", "head on label rows", TOPK_PIECE)


@dataclass
class Data:
    """The sequences in the build's order and its batch plan (checked against the build)."""

    seqs: list[np.ndarray]
    masks: list[np.ndarray]
    batches: list[tuple[int, int]]
    pad_id: int
    vocab_size: int

    @property
    def tokens(self) -> int:
        return int(sum(len(s) for s in self.seqs))

    @property
    def label_rows(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    @property
    def padded(self) -> int:
        return int(sum(len(self.seqs[a]) * (b - a) for a, b in self.batches))


# ---------------------------------------------------------------------------------------------
# The bare forward and the plain forward


def bare_forward(model, data: Data, batches: list[tuple[int, int]], label_logits=None) -> dict:
    """The build's forward path alone: trunk on each batch, head on its label rows.

    `label_logits`: the LabelLogits class to use (the unpatched one inside an instrumented build).
    """
    label_logits = label_logits or labels.LabelLogits
    trunk = head = 0.0
    with harness.measure() as span:
        for a, b in batches:
            t0 = time.perf_counter()
            logits = label_logits(model, labels.pad_batch(data.seqs[a:b], data.masks[a:b],
                                                          data.pad_id))
            t1 = time.perf_counter()
            n = logits.n_rows
            for r in range(0, n, build.LOGIT_ROWS):
                models.cut_logits(logits(r, min(n, r + build.LOGIT_ROWS)), data.vocab_size)
            trunk, head = trunk + t1 - t0, head + time.perf_counter() - t1
    return {"seconds": span.seconds, "cpu_seconds": span.cpu_seconds,
            "others_cpu_seconds": span.others_cpu_seconds, "trunk_seconds": trunk,
            "head_seconds": head}


@torch.no_grad()
def plain_forward(model, data: Data) -> float:
    """`model(...).logits` over each padded batch (the head on every position)."""
    start = time.perf_counter()
    for a, b in data.batches:
        batch = labels.pad_batch(data.seqs[a:b], data.masks[a:b], data.pad_id)
        _ = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False).logits
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The build, instrumented


def timed_setup(timers: harness.Timers) -> list[tuple[object, str, object]]:
    """Patches timing the build's setup: hashing the model, fingerprinting the tokenizer, the
    sequences stage (reading, tokenising and writing the rows, reading them back)."""
    return [
        (models, "model_identity", timers.wrap("model identity (weight hash)",
                                               models.model_identity)),
        (models, "tokenizer_fingerprint", timers.wrap("tokenizer fingerprint",
                                                      models.tokenizer_fingerprint)),
        (build, "ensure_sequences", timers.wrap("sequences stage (all)", build.ensure_sequences)),
        (tasks, "load_examples", timers.wrap("read task rows", tasks.load_examples)),
        (tasks, "tokenize_examples", timers.wrap("tokenise", tasks.tokenize_examples)),
        (store.CacheWriter, "write_sequences", timers.wrap(
            "write sequences", store.CacheWriter.write_sequences)),
        (store.CacheReader, "sequence_lists", timers.wrap("read sequences back",
                                                         store.CacheReader.sequence_lists)),
    ]


def instrumented_build(timers: harness.Timers, loaded: tuple, spec: str, data: Data,
                       marks: dict):
    """Patches of what `build_stage` calls, timed; `load_model` serves `loaded` for `spec`.

    Beside each batch the build computes, the bare forward of the same batch runs at the same
    moment (before even batches, after odd ones), so other jobs slow both alike; its time goes
    to `marks["paired_bare_*"]` and is taken out of the build's.
    """
    base, batch_fn = labels.LabelLogits, build.target_batch_fn
    open_stage, finish = store.CacheWriter.open_stage, store.StageWriter.finish
    model = loaded[0]
    marks.update(batches_seen=0, tokens=0)

    def paired_bare(index: int) -> None:
        for key, value in bare_forward(model, data, [data.batches[index]], base).items():
            marks[f"paired_bare_{key}"] = marks.get(f"paired_bare_{key}", 0.0) + value

    class BuildLabelLogits(base):
        """The build constructs one per plan batch, in plan order."""

        def __init__(self, model, batch, vocab_size=None):
            index = marks["batches_seen"]
            marks["batches_seen"] += 1
            if index % 2 == 0:
                paired_bare(index)
            marks["compute_start"] = time.perf_counter()
            marks["tokens"] += batch.n_tokens
            super().__init__(model, batch, vocab_size)
            timers.add("forward (trunk)", time.perf_counter() - marks["compute_start"])

        def __call__(self, start=0, stop=None):
            began = time.perf_counter()
            try:
                return super().__call__(start, stop)
            finally:
                timers.add("head on label rows", time.perf_counter() - began)

    def target_batch_fn(*args, **kwargs):
        compute = batch_fn(*args, **kwargs)

        def timed_compute(batch: int):
            out = compute(batch)
            timers.add("compute_batch (all)", time.perf_counter() - marks["compute_start"])
            if (marks["batches_seen"] - 1) % 2 == 1:
                paired_bare(marks["batches_seen"] - 1)
            marks["last_compute_end"] = time.perf_counter()  # after the paired bare, if any
            return out

        return timed_compute

    def timed_open_stage(*args, **kwargs):
        writer = open_stage(*args, **kwargs)
        marks["loop_start"] = time.perf_counter()  # the last open (create=False) starts the loop
        return writer

    def timed_finish(*args, **kwargs):
        marks["loop_end"] = time.perf_counter()
        timers.add(LOOP_PIECE, marks["loop_end"] - marks["loop_start"])
        return timers.wrap("finish stage (manifest)", finish)(*args, **kwargs)

    return harness.patched(
        harness.serving_models(lambda s: loaded if s == spec else None),
        *timed_setup(timers),
        (labels, "LabelLogits", BuildLabelLogits),
        (sparse, "topk_rows", timers.wrap(TOPK_PIECE, sparse.topk_rows)),
        (build, "target_batch_fn", target_batch_fn),
        (store.CacheWriter, "open_stage", timed_open_stage),
        (store.StageWriter, "encode", timers.wrap("encode shard (writer thread)",
                                                  store.StageWriter.encode)),
        (store.StageWriter, "write_stored_shard", timers.wrap(
            "write shard (writer thread)", store.StageWriter.write_stored_shard)),
        (store.StageWriter, "finish", timed_finish),
    )


def full_build(overrides: dict, loaded: tuple, spec: str, data: Data) -> dict:
    """`build_stage` into a fresh temporary folder; returns wall time and the timed pieces."""
    timers, marks = harness.Timers(), {}
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        cfg = build_config(overrides={**overrides, "cache.cache": str(Path(tmp) / "cache")})
        with instrumented_build(timers, loaded, spec, data, marks), harness.measure() as span:
            manifest = build.build_stage(cfg, "target", progress=False)
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    paired = {k.removeprefix("paired_bare_"): v for k, v in marks.items()
              if k.startswith("paired_bare_")}
    return {
        "seconds_with_paired_bare": span.seconds,
        "seconds": span.seconds - paired["seconds"],
        "cpu_seconds": span.cpu_seconds - paired["cpu_seconds"],
        "others_cpu_seconds_with_paired_bare": span.others_cpu_seconds,
        "paired_bare": paired,
        "pieces": dict(timers.seconds),
        "calls": dict(timers.calls),
        "tokens_through_model": marks["tokens"],
        "write_tail_seconds": marks["loop_end"] - marks["last_compute_end"],
        "counts": manifest.stages[schema.SEQUENCES].counts,
        "shards": manifest.stages[schema.TARGET].counts["shards"],
        "disk_bytes": disk,
    }


# ---------------------------------------------------------------------------------------------
# The top-K candidate


def topk_fused(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """A candidate for `sparse.topk_rows` with the same outputs: top-K of the logits themselves
    (same order as of the log-probs), one logsumexp for the normaliser, and the tail's
    logsumexp with the top-K masked in place (no full-vocabulary log_softmax, no copy).
    Overwrites `logits`, which the build's compute owns (fresh head output)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    values, ids = torch.topk(logits, k, dim=-1)  # (n, K)
    logits.scatter_(1, ids, float("-inf"))
    return {"ids": ids, "logprobs": values - lse[:, None],
            "tail_logmass": torch.logsumexp(logits, dim=-1) - lse}


def topk_variants(logits: torch.Tensor, k: int, rounds: int) -> dict:
    """`sparse.topk_rows` vs `topk_fused` on the same real logits, alternated; their outputs."""
    fns = {"topk_rows": sparse.topk_rows, "topk_fused": topk_fused}

    def timed(name):
        def run(_round):
            x = logits.clone()
            start = time.perf_counter()
            fns[name](x, k)
            return time.perf_counter() - start
        return run

    got = harness.alternate({name: timed(name) for name in fns}, rounds)
    times = {name: [r[name] for r in got] for name in fns}
    a, b = sparse.topk_rows(logits.clone(), k), topk_fused(logits.clone(), k)
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


# ---------------------------------------------------------------------------------------------
# Setup, rounds and summary


def parse_args(argv: list[str] | None):
    p = harness.parser("cache_build", __doc__, rounds=2)
    p.add_argument("--model", default="smollm2-135m", help="target spec (alias, dir, gguf)")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=48, help="task rows (default 48)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--value-encoding", default="float16", choices=schema.VALUE_ENCODINGS)
    p.add_argument("--id-encoding", default="plain", choices=schema.ID_ENCODINGS)
    p.add_argument("--shard-rows", type=int, default=None, help="default: the config's")
    p.add_argument("--chunk-rows", type=int, default=None, help="default: the config's")
    p.add_argument("--plain-forward", action="store_true",
                   help="also time model(...).logits (head on every position)")
    p.add_argument("--topk-rounds", type=int, default=7,
                   help="alternated timings of topk_rows vs topk_fused")
    return p.parse_args(argv)


def config_overrides(args) -> dict:
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
    return overrides


def load(args, cfg) -> tuple[tuple, float, Data]:
    """The model (loaded once), its load time, and the build's sequences and batch plan."""
    start = time.perf_counter()
    dtype = models.resolve_dtype(cfg.models.dtype, torch.device("cpu"))
    model, tokenizer = models.load_model(args.model, dtype=dtype)
    model.eval()
    load_seconds = time.perf_counter() - start
    seqs, masks, _ = labels.order_sequences(tasks.tokenize_split(cfg.data, tokenizer))
    batches = labels.plan_batches(np.array([len(s) for s in seqs]), cfg.cache.batch_tokens)
    pad_id = models.pad_id(tokenizer)
    data = Data(seqs, masks, batches, pad_id, models.real_vocab_size(tokenizer))
    print(f"model {args.model} loaded in {load_seconds:.1f} s; {len(seqs)} sequences, "
          f"{data.tokens} tokens ({data.padded} padded), {data.label_rows} label rows, "
          f"{len(batches)} batches")
    return (model, tokenizer), load_seconds, data


def warm_up(model, data: Data, k: int, rounds: int) -> dict:
    """Warm-up on the shortest batch (first-call allocations, thread pools); its first label
    rows' logits also serve the top-K micro-benchmark."""
    bare_forward(model, data, data.batches[-1:])
    a, b = data.batches[-1]
    logits = labels.LabelLogits(model, labels.pad_batch(data.seqs[a:b], data.masks[a:b],
                                                        data.pad_id))
    sample = models.cut_logits(logits(0, min(logits.n_rows, build.LOGIT_ROWS)),
                               data.vocab_size).contiguous()
    return topk_variants(sample, k, rounds)


def run_ratios(run: dict, tokens: int) -> None:
    """Per-round rates, the three build/bare ratios, and the noise each measure ran under."""
    b = run["build"]
    build_s = b["seconds"]  # the paired bare forwards taken out
    loop_s = b["pieces"][LOOP_PIECE] - b["paired_bare"]["seconds"]
    in_build_forward = b["pieces"]["forward (trunk)"] + b["pieces"]["head on label rows"]
    run.update({
        "bare_tokens_per_s": tokens / run["bare"]["seconds"],
        "paired_bare_tokens_per_s": tokens / b["paired_bare"]["seconds"],
        "build_tokens_per_s": tokens / build_s,
        "build_loop_tokens_per_s": tokens / loop_s,
        # Three estimates of build/bare, from the noisiest to the least noisy here: a separate
        # bare pass; the bare forward of each batch run right beside the build's (same moment,
        # same load); the share of the build's own time in its forward path.
        "ratio_separate": run["bare"]["seconds"] / build_s,
        "ratio_paired": b["paired_bare"]["seconds"] / build_s,
        "ratio_paired_loop_only": b["paired_bare"]["seconds"] / loop_s,
        "ratio_forward_share": in_build_forward / build_s,
        # Process CPU time also counts the writer thread's work, hidden from the wall clock.
        "ratio_paired_cpu": b["paired_bare"]["cpu_seconds"] / b["cpu_seconds"],
        # Cores other processes kept busy: the noise each measure ran under.
        "others_cores_bare": run["bare"]["others_cpu_seconds"] / run["bare"]["seconds"],
        "others_cores_paired_bare": (b["paired_bare"]["others_cpu_seconds"]
                                     / b["paired_bare"]["seconds"]),
        "others_cores_build": ((b["others_cpu_seconds_with_paired_bare"]
                                - b["paired_bare"]["others_cpu_seconds"]) / build_s),
    })
    print(f"round {run['round']}: bare {run['bare']['seconds']:.1f} s, paired bare "
          f"{b['paired_bare']['seconds']:.1f} s, build {build_s:.1f} s; build/bare separate "
          f"{run['ratio_separate']:.3f}, paired {run['ratio_paired']:.3f}, forward share "
          f"{run['ratio_forward_share']:.3f}; other processes' cores: bare "
          f"{run['others_cores_bare']:.2f}, paired {run['others_cores_paired_bare']:.2f}, "
          f"build {run['others_cores_build']:.2f}")


def measure_rounds(args, overrides: dict, loaded: tuple, data: Data) -> list[dict]:
    """Bare and build alternated over the rounds (plus the plain forward after each round)."""
    model = loaded[0]
    runs = harness.alternate({
        "bare": lambda _: bare_forward(model, data, data.batches),
        "build": lambda _: full_build(overrides, loaded, args.model, data),
    }, args.rounds)
    for run in runs:
        if args.plain_forward:
            run["plain_forward_seconds"] = plain_forward(model, data)
        got = run["build"]["tokens_through_model"]
        if got != data.tokens:
            raise SystemExit(f"build ran {got} tokens, bare {data.tokens}: the sequences "
                             "differ, the comparison is void")
        run_ratios(run, data.tokens)
    return runs


SUMMARY_KEYS = ("bare_tokens_per_s", "paired_bare_tokens_per_s", "build_tokens_per_s",
                "build_loop_tokens_per_s", "ratio_separate", "ratio_paired",
                "ratio_paired_loop_only", "ratio_forward_share", "ratio_paired_cpu",
                "others_cores_bare", "others_cores_paired_bare", "others_cores_build")


def median_of(runs: list[dict], *path: str) -> float:
    def get(run):
        for key in path:
            run = run[key]
        return run
    return statistics.median(get(r) for r in runs)


def summarize(runs: list[dict], data: Data, plain: bool) -> tuple[dict, dict, dict]:
    """(summary ratios, the build's pieces, derived pieces), medians over the rounds."""
    summary = {k: median_of(runs, k) for k in SUMMARY_KEYS}
    summary["goal_ratio"] = 0.9
    if plain:
        summary["plain_forward_tokens_per_s"] = statistics.median(
            data.tokens / r["plain_forward_seconds"] for r in runs)
    names = list(dict.fromkeys(n for r in runs for n in r["build"]["pieces"]))
    pieces = {n: statistics.median(r["build"]["pieces"].get(n, 0.0) for r in runs)
              for n in names}
    pieces[LOOP_PIECE] -= median_of(runs, "build", "paired_bare", "seconds")
    build_med = median_of(runs, "build", "seconds")
    compute = pieces["compute_batch (all)"]
    derived = {
        "compute_batch other (numpy copies, casts, cut)":
            compute - sum(pieces.get(n, 0.0) for n in IN_COMPUTE),
        "shard loop minus compute (queue, concat, write tail)": pieces[LOOP_PIECE] - compute,
        "write tail after last compute (not overlapped)":
            median_of(runs, "build", "write_tail_seconds"),
        "build outside shard loop (setup, manifests)": build_med - pieces[LOOP_PIECE],
    }
    return summary, pieces, derived


def print_tables(runs, data: Data, summary, pieces, derived, load_seconds, plain) -> None:
    bare_med = median_of(runs, "bare", "seconds")
    paired_med = median_of(runs, "build", "paired_bare", "seconds")
    build_med = median_of(runs, "build", "seconds")
    tokens = data.tokens
    rows = [["bare forward, separate pass", bare_med, tokens / bare_med, ""],
            ["  of which trunk", median_of(runs, "bare", "trunk_seconds"), "", ""],
            ["  of which head on label rows", median_of(runs, "bare", "head_seconds"), "", ""],
            ["bare forward, paired with the build", paired_med, tokens / paired_med, ""]]
    if plain:
        plain_s = median_of(runs, "plain_forward_seconds")
        rows.append(["plain forward (model(...).logits)", plain_s, tokens / plain_s, ""])
    rows += [["full build (load and paired bare excluded)", build_med, tokens / build_med, ""],
             ["  build/bare: separate pass", "", "", summary["ratio_separate"]],
             ["  build/bare: paired", "", "", summary["ratio_paired"]],
             ["  build/bare: paired, shard loop only", "", "", summary["ratio_paired_loop_only"]],
             ["  build/bare: forward share of build time", "", "",
              summary["ratio_forward_share"]],
             ["  build/bare: paired, process CPU time", "", "", summary["ratio_paired_cpu"]],
             ["model load (once, excluded)", load_seconds, "", ""]]
    print()
    print(harness.format_table(["measure (median of rounds)", "seconds", "tokens/s", "ratio"],
                               rows))
    print()
    print(harness.format_table(
        ["build piece (median s)", "seconds", "% of build", "calls"],
        [[n, s, 100 * s / build_med, runs[0]["build"]["calls"].get(n, 0)]
         for n, s in pieces.items()]
        + [[n, s, 100 * s / build_med, ""] for n, s in derived.items()]))


def print_topk(topk: dict, k: int, summary: dict) -> None:
    tb = topk["median_ms"]
    print()
    print(harness.format_table(
        [f"top-K on {topk['rows']} real label rows (K={k})", "median ms", "vs topk_rows"],
        [["sparse.topk_rows (log_softmax, topk, scatter copy, logsumexp)", tb["topk_rows"], 1.0],
         ["topk_fused (logsumexp, topk, in-place scatter, logsumexp)", tb["topk_fused"],
          tb["topk_rows"] / tb["topk_fused"]]]))
    print(f"topk_fused: ids identical {topk['ids_identical']}, max |d logprob| "
          f"{topk['max_abs_diff_logprobs']:.2e}, max |d tail| "
          f"{topk['max_abs_diff_tail_logmass']:.2e}; projected: "
          f"{topk['projected_build_seconds_saved']:.1f} s less build, paired ratio "
          f"{topk['projected_ratio_paired']:.3f}")
    print(f"\nbuild/bare tokens/s: paired {summary['ratio_paired']:.3f}, forward share "
          f"{summary['ratio_forward_share']:.3f}, separate {summary['ratio_separate']:.3f} "
          "(goal >= 0.9)")


WHAT = {
    "bare": "labels.LabelLogits over the padded batch + head on label rows in LOGIT_ROWS blocks "
            "+ cut_logits per planned batch (the build's forward path, no top-K/encode/write)",
    "build": "build_stage(cfg, 'target', progress=False) into a fresh temp folder, model load "
             "patched out (reported once as model_load_seconds)",
    "paired bare": "inside the build, the bare forward of each batch run just before (even "
                   "batches) or after (odd) the build computes it; its time is subtracted from "
                   "the build's",
    "ratio_forward_share": "(trunk + head time inside the build) / build time",
    "tokens": "real (unpadded) tokens run through the model",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = harness.start(args)
    overrides = config_overrides(args)
    cfg = build_config(overrides={**overrides, "cache.cache": "/nonexistent"})
    loaded, load_seconds, data = load(args, cfg)
    topk = warm_up(loaded[0], data, cfg.cache.topk, args.topk_rounds)
    runs = measure_rounds(args, overrides, loaded, data)
    summary, pieces, derived = summarize(runs, data, args.plain_forward)
    tb = topk["median_ms"]
    per_row_gain = (tb["topk_rows"] - tb["topk_fused"]) / 1e3 / topk["rows"]
    build_med = median_of(runs, "build", "seconds")
    topk["projected_build_seconds_saved"] = per_row_gain * data.label_rows
    topk["projected_ratio_paired"] = (median_of(runs, "build", "paired_bare", "seconds")
                                      / (build_med - per_row_gain * data.label_rows))
    print_tables(runs, data, summary, pieces, derived, load_seconds, args.plain_forward)
    print_topk(topk, cfg.cache.topk, summary)
    harness.write_json(args.out, {
        "benchmark": "cache_build",
        "what": WHAT,
        "machine": info,
        "settings": {**vars(args), "config": cfg.to_dict(("cache",))["cache"]},
        "data": {"sequences": len(data.seqs), "tokens": data.tokens,
                 "padded_tokens": data.padded, "label_rows": data.label_rows,
                 "batches": len(data.batches), "vocab_size": data.vocab_size},
        "model_load_seconds": load_seconds,
        "summary": summary,
        "pieces_median_seconds": pieces,
        "derived_median_seconds": derived,
        "topk_variants": topk,
        "runs": runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
