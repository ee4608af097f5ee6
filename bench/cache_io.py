"""Bytes per label token, fidelity and read speed of a real target cache, four encodings.

1. One model pass: `build_stage(cfg, "target")` (float16 values, plain ids) on real task rows,
   with `sparse.topk_rows` wrapped so the float32 top-K rows are kept as the fidelity reference.
   (Or `--cache DIR`: an existing top-K cache, whose decoded rows become the reference.)
2. Those rows are written again four ways, value_encoding float16|uint8q x id_encoding
   plain|delta, each into a copy of the cache through `CacheWriter.open_stage(..., rebuild=True)`
   with the stage's params set accordingly, `StageWriter.encode` (timed apart), `write_stored_shard`
   and `finish` (the float16/plain rewrite is checked byte-identical to the build's own).
3. Size per label token of the target stage (ids, logprobs, tail_logmass; `nbytes_stored`),
   against dense fp16 logits (V * 2 B) and raw uint16 ids + fp16 values (4 * K B).
4. Fidelity against the float32 rows: max |p error|, KL between the coarse (top-K + tail)
   distributions, and the change of a real loss: the sparse forward KL of the untrained draft
   against each stored target.
5. Random batches of `--batch-seqs` sequences through `CacheReader` (sequence + its target rows
   decoded): cold (every cache file dropped from the page cache with posix_fadvise, new reader),
   warm (same batches again) and warm with the zarr arrays read directly (the reader's own cost
   taken out). Compared with what a training step consumes: a draft-only forward (trunk, then
   the head on label rows only) + sparse KD loss + backward + AdamW step on batches of the same
   size.

Commands: bench/README.md.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.storage import MemoryStore

import harness
from adaspec import build, labels, losses, models, sparse
from adaspec.config import build_config
from cache_tools import schema, store

COMBOS = [("float16", "plain"), ("float16", "delta"), ("uint8q", "plain"), ("uint8q", "delta")]
READ_MODES = ("cold", "warm", "warm_arrays_opened_once")
GOAL_BYTES = 100.0


# ---------------------------------------------------------------------------------------------
# Caches


def build_reference(cfg) -> dict[str, np.ndarray]:
    """Build the float16/plain cache; return the float32 top-K rows the build computed."""
    stash: list[dict] = []
    original = sparse.topk_rows

    def keep(logits, k):
        rows = original(logits, k)
        stash.append({name: v.cpu().numpy().copy() for name, v in rows.items()})
        return rows

    with harness.patched((sparse, "topk_rows", keep)):
        build.build_stage(cfg, "target", progress=False)
    # Blocks are computed once each, in row order (batches in plan order, LOGIT_ROWS blocks).
    return {name: np.concatenate([s[name] for s in stash]) for name in stash[0]}


def rewrite_target(src_root: Path, dst_root: Path, task: str, split: str, rows: dict,
                   value_encoding: str, id_encoding: str, vocab_size: int) -> dict:
    """Copy a cache and write its target stage anew from float32 rows in another encoding."""
    shutil.copytree(src_root, dst_root)
    stored = store.CacheReader(str(src_root), task, split).group[schema.TARGET]["ids"]
    shard_rows, chunk_rows = stored.shards[0], stored.chunks[0]
    writer = store.CacheWriter(str(dst_root), task, split)
    params = {**writer.manifest.target_params, schema.VALUE_ENCODING: value_encoding,
              schema.ID_ENCODING: id_encoding}
    stage = writer.open_stage(schema.TARGET, params, vocab_size, shard_rows, chunk_rows,
                              create=True, rebuild=True)
    encode = write = 0.0
    for shard in stage.pending_shards():
        a, b = stage.shard_range(shard)
        t0 = time.perf_counter()
        values = stage.encode({name: v[a:b] for name, v in rows.items()})
        t1 = time.perf_counter()
        stage.write_stored_shard(shard, values)
        encode, write = encode + t1 - t0, write + time.perf_counter() - t1
    if stage.finish() is None:
        raise SystemExit(f"{dst_root}: the rewritten target stage is incomplete")
    return {"encode_seconds": encode, "write_seconds": write, "shard_rows": shard_rows,
            "chunk_rows": chunk_rows}


def stage_bytes(root: Path, task: str, split: str, stage: str) -> dict[str, dict]:
    """Stored and raw bytes of every array of a stage."""
    group = store.open_root(str(root), mode="r")[store.split_path(task, split)][stage]
    out = {}
    for name in group.array_keys():
        array = group[name]
        out[name] = {"stored": int(array.nbytes_stored()),
                     "raw": int(np.prod(array.shape)) * array.dtype.itemsize}
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def count_files(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the folder's cached file pages (no root needed)."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# Candidates outside the schema: a per-token K


# Keep only the entries a rule selects, move the rest's mass into the tail, store the kept ones
# as uint8q/delta and pad the row with empty slots (id delta 0, value 255). Needs a format change
# (uint8q 255 = empty slot, decoded to logprob -inf) and losses that skip empty slots.
CANDIDATES = {
    "per-token K: p >= 1e-5": ("p", 1e-5),
    "per-token K: p >= 1e-4": ("p", 1e-4),
    "per-token K: tail <= 1e-3": ("tail", 1e-3),
}


def in_memory_bytes(values: np.ndarray, shard_rows: int, chunk_rows: int) -> int:
    """Stored bytes of one row array written like the cache's (same shards, chunks, codecs)."""
    array = zarr.create_array(store=MemoryStore(), shape=values.shape, dtype=values.dtype,
                              shards=(shard_rows,) + values.shape[1:],
                              chunks=(chunk_rows,) + values.shape[1:],
                              compressors=schema.compressors(values.dtype))
    array[:] = values
    return int(array.nbytes_stored())


def per_token_k(ref: dict, rule: str, threshold: float, vocab_size: int, shard_rows: int,
                chunk_rows: int) -> tuple[dict, dict]:
    """(stats with bytes per label token, decoded rows with empty slots as duplicate ids)."""
    ids, logprobs, tail = ref["ids"], ref["logprobs"], ref["tail_logmass"]
    n = len(ids)
    if rule == "p":
        keep = logprobs >= np.log(threshold)
    else:  # keep ranks (largest first) while the mass from there on, tail included, > threshold
        probs = np.exp(logprobs.astype(np.float64))
        after = np.cumsum(probs[:, ::-1], 1)[:, ::-1] + np.exp(tail.astype(np.float64))[:, None]
        keep = np.concatenate([np.ones((n, 1), bool), after[:, 1:] > threshold], 1)
    keep[:, 0] = True  # the most likely token always stays
    order = np.argsort(np.where(keep, ids, ids + vocab_size), 1, kind="stable")  # kept first
    ids_s = np.take_along_axis(ids, order, 1)
    lp_s = np.take_along_axis(logprobs, order, 1)
    kept = np.take_along_axis(keep, order, 1)
    last = np.take_along_axis(ids_s, kept.sum(1, keepdims=True) - 1, 1)
    ids_s = np.where(kept, ids_s, last)  # (N, K) empty slots repeat the last kept id
    deltas = ids_s.copy()
    deltas[:, 1:] = ids_s[:, 1:] - ids_s[:, :-1]
    stored_q = np.where(kept, schema.encode_logprobs(lp_s, "uint8q"), 255).astype(np.uint8)
    dropped = np.where(kept, -np.inf, lp_s.astype(np.float64))
    top = np.max(dropped, 1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        dropped_lse = np.log(np.exp(dropped - top).sum(1)) + top[:, 0]
    new_tail = np.logaddexp(tail.astype(np.float64), dropped_lse).astype(np.float32)
    sizes = {
        "ids": in_memory_bytes(deltas.astype(schema.id_dtype(vocab_size)), shard_rows, chunk_rows),
        "logprobs": in_memory_bytes(stored_q, shard_rows, chunk_rows),
        "tail_logmass": in_memory_bytes(new_tail, shard_rows, chunk_rows),
    }
    decoded = {"ids": ids_s.astype(np.int64),
               "logprobs": np.where(kept, schema.decode_logprobs(stored_q, "uint8q"), -np.inf
                                    ).astype(np.float32),
               "tail_logmass": new_tail}
    moved = np.exp(dropped_lse)
    stats = {"bytes_per_label_token": {**{k: v / n for k, v in sizes.items()},
                                       "total": sum(sizes.values()) / n},
             "mean_k": float(kept.sum(1).mean()), "min_k": int(kept.sum(1).min()),
             "mass_moved_to_tail_mean": float(moved.mean()),
             "mass_moved_to_tail_max": float(moved.max())}
    return stats, decoded


# ---------------------------------------------------------------------------------------------
# Fidelity


def canonical(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by id, so plain and delta storage orders compare entry by entry."""
    order = np.argsort(ids, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(logprobs, order, -1)


def coarse_kl(ref_lp, ref_tail, lp, tail) -> np.ndarray:
    """(N,) KL(P_ref || P) between (K+1)-atom distributions (top-K + tail), each renormalised."""
    p = np.exp(np.concatenate([ref_lp, ref_tail[:, None]], 1).astype(np.float64))
    q = np.exp(np.concatenate([lp, tail[:, None]], 1).astype(np.float64))
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)
    return terms.sum(1)


def fidelity(ref: dict, dec: dict, fp16: dict) -> dict:
    ref_ids, ref_lp = canonical(ref["ids"], ref["logprobs"])
    ids, lp = canonical(dec["ids"], dec["logprobs"])
    _, fp16_lp = canonical(fp16["ids"], fp16["logprobs"])
    p_err = np.abs(np.exp(lp.astype(np.float64)) - np.exp(ref_lp.astype(np.float64)))
    mass = np.exp(lp.astype(np.float64)).sum(1) + np.exp(dec["tail_logmass"].astype(np.float64))
    kl_ref = coarse_kl(ref_lp, ref["tail_logmass"], lp, dec["tail_logmass"])
    kl_fp16 = coarse_kl(fp16_lp, fp16["tail_logmass"], lp, dec["tail_logmass"])
    return {
        "ids_identical": bool(np.array_equal(ids, ref_ids)),
        "max_abs_err_p": float(p_err.max()),
        "mean_abs_err_p": float(p_err.mean()),
        "max_abs_err_logprob_where_p_gt_1e-4": float(
            np.abs(lp - ref_lp)[ref_lp > math.log(1e-4)].max()),
        "max_abs_mass_error": float(np.abs(mass - 1).max()),
        "coarse_kl_vs_float32_mean": float(kl_ref.mean()),
        "coarse_kl_vs_float32_max": float(kl_ref.max()),
        "coarse_kl_vs_float16_mean": float(kl_fp16.mean()),
        "coarse_kl_vs_float16_max": float(kl_fp16.max()),
    }


@torch.no_grad()
def draft_losses(draft, seqs, masks, targets: dict[str, dict], pad_id: int, vocab_size: int,
                 batch_tokens: int) -> dict[str, np.ndarray]:
    """(N,) sparse forward KL of the draft against each stored target, all label rows."""
    out: dict[str, list] = {name: [] for name in targets}
    row = 0
    for a, b in labels.plan_batches(np.array([len(s) for s in seqs]), batch_tokens):
        logits_of = labels.LabelLogits(draft, labels.pad_batch(seqs[a:b], masks[a:b], pad_id),
                                       vocab_size)
        n = logits_of.n_rows
        for r in range(0, n, build.LOGIT_ROWS):
            logits = logits_of(r, min(n, r + build.LOGIT_ROWS))
            lo, hi = row + r, row + min(n, r + build.LOGIT_ROWS)
            for name, rows in targets.items():
                part = {k: np.ascontiguousarray(v[lo:hi]) for k, v in rows.items()}
                part["ids"] = part["ids"].astype(np.int64)
                part["logprobs"] = part["logprobs"].astype(np.float32)
                out[name].append(losses.sparse_divergence(logits, sparse.from_rows(part),
                                                          "fkl").numpy())
        row += n
    return {name: np.concatenate(v) for name, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Reading and consuming


def read_stats(per_batch: list[float], rows: int, tokens: int) -> dict:
    total = sum(per_batch)
    return {"seconds": total, "ms_per_batch_median": 1e3 * statistics.median(per_batch),
            "ms_per_batch_mean": 1e3 * total / len(per_batch), "rows": rows, "tokens": tokens,
            "rows_per_s": rows / total, "tokens_per_s": tokens / total}


def read_batches(reader, batches: list[np.ndarray]) -> dict:
    """Each batch: `sequence(i)` and `target_rows(...)` of its sequences, timed apart."""
    seq_s, tgt_s, per_batch, rows, tokens = 0.0, 0.0, [], 0, 0
    for idx in batches:
        t_batch = time.perf_counter()
        for i in idx:
            t0 = time.perf_counter()
            input_ids, _ = reader.sequence(int(i))
            t1 = time.perf_counter()
            got = reader.target_rows(int(reader.label_offsets[i]), int(reader.label_offsets[i + 1]))
            seq_s, tgt_s = seq_s + t1 - t0, tgt_s + time.perf_counter() - t1
            rows, tokens = rows + len(got["ids"]), tokens + len(input_ids)
        per_batch.append(time.perf_counter() - t_batch)
    return {**read_stats(per_batch, rows, tokens), "sequence_seconds": seq_s,
            "target_seconds": tgt_s}


def read_batches_opened_once(reader, batches: list[np.ndarray]) -> dict:
    """The same reads straight from the zarr arrays, opened once, with the (small) tokens in
    memory and the same decoding: the floor under what `CacheReader` costs per call."""
    target = reader.group[schema.TARGET]
    arrays = {name: target[name] for name in ("ids", "logprobs", "tail_logmass")}
    flat_ids, _ = reader.all_tokens()
    value_enc = reader.target_params.get(schema.VALUE_ENCODING, "float16")
    id_enc = reader.target_params.get(schema.ID_ENCODING, "plain")
    per_batch, rows, tokens = [], 0, 0
    for idx in batches:
        t0 = time.perf_counter()
        for i in idx:
            input_ids = flat_ids[reader.offsets[i]:reader.offsets[i + 1]]
            a, b = int(reader.label_offsets[i]), int(reader.label_offsets[i + 1])
            ids = schema.decode_ids(arrays["ids"][a:b], id_enc)
            schema.decode_logprobs(arrays["logprobs"][a:b], value_enc)
            arrays["tail_logmass"][a:b].astype(np.float32)
            rows, tokens = rows + len(ids), tokens + len(input_ids)
        per_batch.append(time.perf_counter() - t0)
    return read_stats(per_batch, rows, tokens)


def train_steps(draft, reader, batches: list[np.ndarray], steps: int, pad_id: int,
                vocab_size: int) -> dict:
    """Draft-only steps: trunk forward, head on label rows, sparse fKL vs the cached target,
    backward, AdamW. The first step is a warm-up and is not counted."""
    draft.train()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-5)
    head = draft.get_output_embeddings()
    times, tokens, rows = [], [], []
    for step, idx in enumerate(batches[: steps + 1]):
        seqs, masks = zip(*(reader.sequence(int(i)) for i in idx), strict=True)
        parts = [reader.target_rows(int(reader.label_offsets[i]),
                                    int(reader.label_offsets[i + 1])) for i in idx]
        target = sparse.from_rows({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        t0 = time.perf_counter()
        batch = labels.pad_batch(list(seqs), list(masks), pad_id)
        logits = models.cut_logits(head(labels.label_hidden(draft, batch)), vocab_size)
        loss = losses.sparse_divergence(logits, target, "fkl").mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
            tokens.append(batch.n_tokens)
            rows.append(batch.n_labels)
    draft.eval()
    total = sum(times)
    return {"steps": len(times), "seconds": times, "tokens_per_s": sum(tokens) / total,
            "rows_per_s": sum(rows) / total, "ms_per_step": 1e3 * total / len(times)}


# ---------------------------------------------------------------------------------------------
# The steps of the run


def parse_args(argv: list[str] | None):
    p = harness.parser("cache_io", __doc__)
    p.add_argument("--model", default="smollm2-135m", help="target spec for the build")
    p.add_argument("--draft", default="smollm2-135m@layers=2", help="draft spec (consumer)")
    p.add_argument("--cache", default=None, help="existing top-K cache root (skips the build)")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--batch-seqs", type=int, default=16, help="sequences per read/train batch")
    p.add_argument("--read-batches", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=2, help="timed steps (+1 warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the caches here (default: temp)")
    return p.parse_args(argv)


def reference_rows(args, work: Path) -> tuple[Path, dict, str, float]:
    """(the cache the rows come from, the float32 reference rows, what they are, seconds)."""
    t0 = time.perf_counter()
    if args.cache is None:
        base = work / "built-float16-plain"
        cfg = build_config(overrides={
            "models.target": args.model, "data.task": args.task, "data.split": args.split,
            "data.data_files": args.data_files, "data.limit": args.limit,
            "data.max_length": args.max_length, "cache.topk": args.topk,
            "cache.batch_tokens": args.batch_tokens, "cache.cache": str(base),
            "cache.sparse": "topk", "cache.value_encoding": "float16",
            "cache.id_encoding": "plain"})
        ref, reference = build_reference(cfg), "float32 top-K rows of the build's model pass"
    else:
        base = Path(args.cache)
        existing = store.CacheReader(str(base), args.task, args.split)
        if existing.target_params.get(schema.MODE) != "topk":
            raise SystemExit(f"--cache {base}: its target stage is not top-K (--sparse topk)")
        ref = existing.target_rows(0, existing.n_label_rows)
        reference = f"decoded rows of {base}"
    return base, ref, reference, time.perf_counter() - t0


def encode_combos(args, base: Path, work: Path, ref: dict, vocab: int) -> tuple[dict, dict]:
    """The four encodings written and sized; (per-combo facts, decoded rows per combo)."""
    task, split = args.task, args.split
    n_rows = len(ref["ids"])
    combos, decoded = {}, {}
    for value_enc, id_enc in COMBOS:
        name = f"{value_enc}/{id_enc}"
        root = work / f"{value_enc}-{id_enc}"
        if root.exists():
            shutil.rmtree(root)
        timing = rewrite_target(base, root, task, split, ref, value_enc, id_enc, vocab)
        sizes = stage_bytes(root, task, split, schema.TARGET)
        per_token = {a: s["stored"] / n_rows for a, s in sizes.items()}
        stored = sum(s["stored"] for s in sizes.values())
        raw = sum(s["raw"] for s in sizes.values())
        combos[name] = {"root": str(root), **timing, "arrays": sizes,
                        "bytes_per_label_token": {**per_token, "total": stored / n_rows},
                        "compression_ratio": raw / stored,
                        "files_target_stage": count_files(root / task / split / schema.TARGET)}
        decoded[name] = store.CacheReader(str(root), task, split).target_rows(0, n_rows)
    return combos, decoded


def loss_fidelity(entry: dict, loss: np.ndarray, reference: np.ndarray) -> None:
    """The change of the draft's per-token loss against a stored target (vs float32 rows)."""
    diff = np.abs(loss - reference)
    entry.update({
        "draft_fkl_mean": float(loss.mean()),
        "draft_fkl_float32_mean": float(reference.mean()),
        "draft_fkl_abs_diff_mean": float(diff.mean()),
        "draft_fkl_abs_diff_max": float(diff.max()),
        "draft_fkl_abs_diff_mean_over_loss": float(diff.mean() / reference.mean()),
        "draft_fkl_rel_diff_of_mean": float(abs(loss.mean() / reference.mean() - 1)),
    })


def fidelities(args, combos, decoded, ref, base_reader, vocab) -> tuple:
    """Fidelity of every combo and per-token-K candidate; (candidates, losses, draft, pad id,
    draft load seconds)."""
    for name in combos:
        combos[name]["fidelity"] = fidelity(ref, decoded[name], decoded["float16/plain"])
    t0 = time.perf_counter()
    draft, tokenizer = models.load_model(args.draft,
                                         dtype=models.resolve_dtype("auto", torch.device("cpu")))
    draft_load = time.perf_counter() - t0
    pad_id = models.pad_id(tokenizer)
    seqs, masks = base_reader.sequence_lists()
    candidates, candidate_rows = {}, {}
    shard_rows = combos["uint8q/delta"]["shard_rows"]
    chunk_rows = combos["uint8q/delta"]["chunk_rows"]
    for name, (rule, threshold) in CANDIDATES.items():
        candidates[name], candidate_rows[name] = per_token_k(ref, rule, threshold, vocab,
                                                             shard_rows, chunk_rows)
    got = draft_losses(draft, seqs, masks, {"float32": ref, **decoded, **candidate_rows},
                       pad_id, vocab, args.batch_tokens)
    for name, entry in [*((n, combos[n]["fidelity"]) for n in combos), *candidates.items()]:
        loss_fidelity(entry, got[name], got["float32"])
    return candidates, got, draft, pad_id, draft_load


def read_vs_consume(args, combos, base_reader, draft, pad_id, vocab) -> tuple[dict, int]:
    """Random batches read cold, warm and from the arrays directly, vs draft training steps."""
    rng = np.random.default_rng(args.seed)
    n_seq = base_reader.n_sequences
    size = min(args.batch_seqs, n_seq)
    batches = [rng.choice(n_seq, size, replace=False) for _ in range(args.read_batches)]
    for combo in combos.values():
        root = Path(combo["root"])
        drop_page_cache(root)
        t0 = time.perf_counter()
        reader = store.CacheReader(str(root), args.task, args.split)
        open_s = time.perf_counter() - t0
        cold = read_batches(reader, batches)
        warm = read_batches(reader, batches)
        once = read_batches_opened_once(reader, batches)
        combo["read"] = {"open_seconds_cold": open_s, "cold": cold, "warm": warm,
                         "warm_arrays_opened_once": once}
    consume = train_steps(draft, base_reader, batches, args.train_steps, pad_id, vocab)
    for combo in combos.values():
        for mode in READ_MODES:
            combo["read"][mode]["ratio_rows_read_over_consumed"] = (
                combo["read"][mode]["rows_per_s"] / consume["rows_per_s"])
    return consume, size


def files_estimate(combos: dict, base_reader, n_rows: int) -> dict:
    """Files per 1e6 label tokens at the default shard size: one file per shard and row array,
    one `_done` entry per shard, plus metadata; sequences at their share of tokens."""
    shard_rows = schema.DEFAULT_SHARD_ROWS
    shards = math.ceil(1e6 / shard_rows)
    row_arrays = len(combos["uint8q/delta"]["arrays"]) - 1  # without _done
    target_files = shards * (row_arrays + 1) + (row_arrays + 1) + 1
    seq_tokens_per_m = 1e6 * int(base_reader.offsets[-1]) / n_rows
    seq_chunks = math.ceil(seq_tokens_per_m / schema.SEQUENCE_CHUNK)
    seq_files = 2 * seq_chunks + 3 + 6  # input_ids + label_mask chunks, small arrays, metadata
    return {"shard_rows": shard_rows, "chunk_rows": schema.DEFAULT_CHUNK_ROWS,
            "target_stage_files_per_1e6_label_tokens": target_files,
            "sequences_files_per_1e6_label_tokens": seq_files,
            "total_per_1e6_label_tokens": target_files + seq_files,
            "counted_here": {n: c["files_target_stage"] for n, c in combos.items()}}


def goal(total: float) -> str:
    return "yes" if total <= GOAL_BYTES else "no"


def print_size_and_fidelity(combos: dict, candidates: dict, vocab: int, k: int,
                            float32_loss: float) -> None:
    dense, raw_topk = vocab * 2, 4 * k
    print()
    print(harness.format_table(
        ["encoding", "ids B/tok", "logprobs B/tok", "tail B/tok", "total B/tok", "compression",
         "vs dense fp16", "vs raw 4K B", f"<= {GOAL_BYTES:.0f}?"],
        [[n, c["bytes_per_label_token"]["ids"], c["bytes_per_label_token"]["logprobs"],
          c["bytes_per_label_token"]["tail_logmass"], c["bytes_per_label_token"]["total"],
          c["compression_ratio"], dense / c["bytes_per_label_token"]["total"],
          raw_topk / c["bytes_per_label_token"]["total"],
          goal(c["bytes_per_label_token"]["total"])] for n, c in combos.items()]))
    print()
    print(harness.format_table(
        ["encoding", "max|dp|", "mean|dp|", "KL coarse vs f32", "KL coarse vs f16",
         "draft fKL |diff| mean", "|diff|/loss", "rel diff of mean"],
        [[n, f["max_abs_err_p"], f["mean_abs_err_p"], f["coarse_kl_vs_float32_mean"],
          f["coarse_kl_vs_float16_mean"], f["draft_fkl_abs_diff_mean"],
          f["draft_fkl_abs_diff_mean_over_loss"], f["draft_fkl_rel_diff_of_mean"]]
         for n, f in ((n, c["fidelity"]) for n, c in combos.items())]))
    print(f"(draft fKL vs float32 target, mean {float32_loss:.4f} nats/token)")
    print()
    print(harness.format_table(
        ["candidate, uint8q/delta + empty slots", "total B/tok", "mean K", "mass to tail max",
         "draft fKL |diff| mean", "|diff|/loss", "rel diff of mean", f"<= {GOAL_BYTES:.0f}?"],
        [[n, c["bytes_per_label_token"]["total"], c["mean_k"], c["mass_moved_to_tail_max"],
          c["draft_fkl_abs_diff_mean"], c["draft_fkl_abs_diff_mean_over_loss"],
          c["draft_fkl_rel_diff_of_mean"], goal(c["bytes_per_label_token"]["total"])]
         for n, c in candidates.items()]))


def print_reads(combos: dict, consume: dict, size: int, draft: str, files: dict) -> None:
    rows = []
    for n, c in combos.items():
        for mode in READ_MODES:
            r = c["read"][mode]
            rows.append([f"{n} {mode}", r["ms_per_batch_median"], r["rows_per_s"],
                         r["tokens_per_s"], r["ratio_rows_read_over_consumed"]])
    rows.append([f"draft step ({draft}, fwd+bwd+AdamW)", consume["ms_per_step"],
                 consume["rows_per_s"], consume["tokens_per_s"], 1.0])
    print()
    print(harness.format_table([f"read {size}-sequence batches", "ms/batch", "label rows/s",
                                "tokens/s", "read/consume"], rows))
    print(f"\nfiles per 1e6 label tokens (shard_rows={files['shard_rows']}): target "
          f"{files['target_stage_files_per_1e6_label_tokens']}, sequences "
          f"{files['sequences_files_per_1e6_label_tokens']}, total "
          f"{files['total_per_1e6_label_tokens']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = harness.start(args)
    tmp = tempfile.TemporaryDirectory(prefix="bench-io-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    task, split = args.task, args.split

    base, ref, reference, build_seconds = reference_rows(args, work)
    base_reader = store.CacheReader(str(base), task, split)
    n_rows, k = ref["ids"].shape
    vocab = base_reader.vocab_size
    built = base_reader.target_rows(0, n_rows)
    if not np.array_equal(canonical(built["ids"], built["logprobs"])[0],
                          canonical(ref["ids"], ref["logprobs"])[0]):
        raise SystemExit("the kept rows do not match the built cache; the comparison is void")
    print(f"{n_rows} label rows, K={k}, V={vocab}; reference: {reference} ({build_seconds:.0f} s)")

    combos, decoded = encode_combos(args, base, work, ref, vocab)
    same = None
    if args.cache is None:
        same = folder_bytes(base / task / split / schema.TARGET) == folder_bytes(
            Path(combos["float16/plain"]["root"]) / task / split / schema.TARGET)
    candidates, got, draft, pad_id, draft_load = fidelities(args, combos, decoded, ref,
                                                            base_reader, vocab)
    consume, size = read_vs_consume(args, combos, base_reader, draft, pad_id, vocab)
    files = files_estimate(combos, base_reader, n_rows)

    print_size_and_fidelity(combos, candidates, vocab, k, float(got["float32"].mean()))
    print_reads(combos, consume, size, args.draft, files)
    print(f"float16/plain rewrite byte-identical to the build's own: {same}")
    meets = [n for n, c in combos.items() if c["bytes_per_label_token"]["total"] <= GOAL_BYTES]
    print(f"<= {GOAL_BYTES:.0f} B/label token at K={k}: {', '.join(meets) or 'none'}")
    harness.write_json(args.out, {
        "benchmark": "cache_io",
        "machine": info,
        "settings": vars(args),
        "data": {"label_rows": n_rows, "k": k, "vocab_size": vocab,
                 "sequences": base_reader.n_sequences, "tokens": int(base_reader.offsets[-1]),
                 "reference": reference, "model_pass_seconds": build_seconds,
                 "draft_load_seconds": draft_load},
        "baselines_bytes_per_label_token": {"dense_fp16_logits": vocab * 2,
                                            "raw_uint16_ids_fp16_values": 4 * k,
                                            "distillkit_approx": 300, "goal": GOAL_BYTES},
        "sequences_stage_bytes_per_label_token": sum(
            s["stored"] for s in stage_bytes(base, task, split, schema.SEQUENCES).values()
        ) / n_rows,
        "float16_plain_rewrite_identical_to_build": same,
        "combos": combos,
        "candidates_per_token_k": candidates,
        "consume": consume,
        "files": files,
        "meets_goal": meets,
        "loadavg_end": os.getloadavg(),
    })
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
