"""Bytes per label token, fidelity and read speed of a real target cache, four encodings.

1. One model pass: `build_stage(cfg, "target")` (float16 values, plain ids) on real task rows,
   with `topk_rows` wrapped so the float32 top-K rows are kept as the fidelity reference. (Or
   `--cache DIR`: an existing cache, whose decoded rows become the reference.)
2. Those rows are written through `cache_tools.store.StageWriter` four ways, value_encoding
   float16|uint8q x id_encoding plain|delta, each in a copy of the cache with its manifest set
   accordingly (the float16/plain rewrite is checked byte-identical to the build's own).
3. Size per label token of the target stage (ids, logprobs, tail_logmass; `nbytes_stored`),
   against dense fp16 logits (V * 2 B) and raw uint16 ids + fp16 values (4 * K B).
4. Fidelity against the float32 rows: max |p error|, KL between the coarse (top-K + tail)
   distributions, and the change of a real loss: the sparse forward KL of the untrained draft
   against each stored target.
5. Random batches of `--batch-seqs` sequences through `CacheReader` (sequence + its target rows
   decoded): cold (every cache file dropped from the page cache with posix_fadvise, new reader)
   and warm (same batches again). Compared with what a training step consumes: a draft-only
   forward (trunk, then the head on label rows only) + sparse KD loss + backward + AdamW step on
   batches of the same size.

    .venv/bin/python bench/cache_io.py                  # ~4 min here
    .venv/bin/python bench/cache_io.py --cache ./cache --task gsm8k --split train
    .venv/bin/python bench/cache_io.py --model /tmp/tiny --draft /tmp/tiny --limit 16 --topk 16
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_build import DEFAULT_DATA, RESULTS, format_table, machine_info, write_json  # noqa: E402

COMBOS = [("float16", "plain"), ("float16", "delta"), ("uint8q", "plain"), ("uint8q", "delta")]
GOAL_BYTES = 100.0


# ---------------------------------------------------------------------------------------------
# Caches


def build_reference(cfg) -> dict[str, np.ndarray]:
    """Build the float16/plain cache; return the float32 top-K rows the build computed."""
    from adaspec import build

    stash: list[dict] = []
    original = build.topk_rows

    def keep(logits, k):
        rows = original(logits, k)
        stash.append({name: v.numpy().copy() for name, v in rows.items()})
        return rows

    with mock.patch.object(build, "topk_rows", keep):
        build.build_stage(cfg, "target", progress=False)
    # Batches are computed once each, in row order (see build._run_shards).
    return {name: np.concatenate([s[name] for s in stash]) for name in stash[0]}


def rewrite_target(src_root: Path, dst_root: Path, task: str, split: str, rows: dict,
                   value_encoding: str, id_encoding: str, vocab_size: int) -> dict:
    """Copy a cache and write its target stage anew from float32 rows in another encoding."""
    from cache_tools import schema, store

    shutil.copytree(src_root, dst_root)
    shutil.rmtree(dst_root / task / split / schema.TARGET)
    group = store.open_root(str(dst_root))[store.split_path(task, split)]
    manifest = store.read_manifest(group)
    stage = manifest["stages"][schema.TARGET]
    stage["params"].update(value_encoding=value_encoding, id_encoding=id_encoding)
    stage["status"] = schema.STATUS_BUILDING
    store.write_manifest(group, manifest)
    n, k = rows["ids"].shape
    arrays = {
        "ids": store.RowArray(schema.id_dtype(vocab_size), k),
        "logprobs": store.RowArray(schema.value_dtype(value_encoding), k),
        "tail_logmass": store.RowArray(np.dtype(np.float32), None, float("-inf")),
    }
    src = store.open_root(str(src_root))[store.split_path(task, split)][schema.TARGET]
    shard_rows, chunk_rows = src["ids"].shards[0], src["ids"].chunks[0]
    writer = store.StageWriter(group, schema.TARGET, n, arrays, shard_rows, chunk_rows)
    encode = write = 0.0
    for shard in writer.pending_shards():
        a, b = writer.shard_range(shard)
        t0 = time.perf_counter()
        ids, logprobs, _ = schema.encode_rows(rows["ids"][a:b], rows["logprobs"][a:b], None,
                                              id_encoding)
        values = {
            "ids": ids.astype(schema.id_dtype(vocab_size)),
            "logprobs": schema.encode_logprobs(logprobs, value_encoding),
            "tail_logmass": rows["tail_logmass"][a:b].astype(np.float32),
        }
        t1 = time.perf_counter()
        writer.write_shard(shard, values)
        encode, write = encode + t1 - t0, write + time.perf_counter() - t1
    stage["status"] = schema.STATUS_COMPLETE
    store.write_manifest(group, manifest)
    return {"encode_seconds": encode, "write_seconds": write, "shard_rows": shard_rows,
            "chunk_rows": chunk_rows}


def stage_bytes(root: Path, task: str, split: str, stage: str) -> dict[str, dict]:
    """Stored and raw bytes of every array of a stage."""
    from cache_tools import store

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
    import zarr
    from zarr.storage import MemoryStore

    from cache_tools import schema

    array = zarr.create_array(store=MemoryStore(), shape=values.shape, dtype=values.dtype,
                              shards=(shard_rows,) + values.shape[1:],
                              chunks=(chunk_rows,) + values.shape[1:],
                              compressors=schema.compressors(values.dtype))
    array[:] = values
    return int(array.nbytes_stored())


def per_token_k(ref: dict, rule: str, threshold: float, vocab_size: int, shard_rows: int,
                chunk_rows: int) -> tuple[dict, dict]:
    """(stats with bytes per label token, decoded rows with empty slots as duplicate ids)."""
    from cache_tools import schema

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
    from adaspec import models
    from adaspec.build import LOGIT_ROWS, label_hidden_and_head, plan_batches
    from adaspec.build import sparse_target_from_rows as to_target
    from adaspec.losses import sparse_divergence

    out: dict[str, list] = {name: [] for name in targets}
    row = 0
    for a, b in plan_batches(np.array([len(s) for s in seqs]), batch_tokens):
        n, logits_fn = label_hidden_and_head(draft, seqs[a:b], masks[a:b], pad_id)
        for r in range(0, n, LOGIT_ROWS):
            logits = models.cut_logits(logits_fn(r, min(n, r + LOGIT_ROWS)), vocab_size)
            lo, hi = row + r, row + min(n, r + LOGIT_ROWS)
            for name, rows in targets.items():
                part = {k: np.ascontiguousarray(v[lo:hi]) for k, v in rows.items()}
                part["ids"] = part["ids"].astype(np.int64)
                part["logprobs"] = part["logprobs"].astype(np.float32)
                out[name].append(sparse_divergence(logits, to_target(part), "fkl").numpy())
        row += n
    return {name: np.concatenate(v) for name, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Reading and consuming


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
    total = sum(per_batch)
    return {"seconds": total, "sequence_seconds": seq_s, "target_seconds": tgt_s,
            "ms_per_batch_median": 1e3 * statistics.median(per_batch),
            "ms_per_batch_mean": 1e3 * total / len(per_batch),
            "rows": rows, "tokens": tokens, "rows_per_s": rows / total,
            "tokens_per_s": tokens / total}


def read_batches_opened_once(reader, batches: list[np.ndarray]) -> dict:
    """The same reads with the target arrays opened once and the (small) tokens in memory:
    what `CacheReader` would cost without re-opening `group["target"]` on every call."""
    from cache_tools import schema

    target = reader.group[schema.TARGET]
    arrays = {name: target[name] for name in ("ids", "logprobs", "tail_logmass")}
    flat_ids, _ = reader.all_tokens()
    value_enc = reader.target_params.get("value_encoding", "float16")
    id_enc = reader.target_params.get("id_encoding", "plain")
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
    total = sum(per_batch)
    return {"seconds": total, "ms_per_batch_median": 1e3 * statistics.median(per_batch),
            "ms_per_batch_mean": 1e3 * total / len(per_batch),
            "rows": rows, "tokens": tokens, "rows_per_s": rows / total,
            "tokens_per_s": tokens / total}


def train_steps(draft, reader, batches: list[np.ndarray], steps: int, pad_id: int,
                vocab_size: int) -> dict:
    """Draft-only steps: trunk forward, head on label rows, sparse fKL vs the cached target,
    backward, AdamW. The first step is a warm-up and is not counted."""
    from adaspec import models
    from adaspec.build import _pad_batch, sparse_target_from_rows
    from adaspec.losses import sparse_divergence

    draft.train()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-5)
    head = draft.get_output_embeddings()
    times, tokens, rows = [], [], []
    for step, idx in enumerate(batches[: steps + 1]):
        seqs, masks = zip(*(reader.sequence(int(i)) for i in idx), strict=True)
        parts = [reader.target_rows(int(reader.label_offsets[i]),
                                    int(reader.label_offsets[i + 1])) for i in idx]
        target = sparse_target_from_rows(
            {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        t0 = time.perf_counter()
        input_ids, attention_mask = _pad_batch(list(seqs), pad_id)
        index_b = torch.from_numpy(
            np.concatenate([np.full(int(m.sum()), b) for b, m in enumerate(masks)]))
        index_t = torch.from_numpy(np.concatenate([np.nonzero(m)[0] - 1 for m in masks]))
        hidden = draft.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state[index_b, index_t]
        logits = models.cut_logits(head(hidden), vocab_size)
        loss = sparse_divergence(logits, target, "fkl").mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
            tokens.append(int(attention_mask.sum()))
            rows.append(len(index_b))
    draft.eval()
    total = sum(times)
    return {"steps": len(times), "seconds": times, "tokens_per_s": sum(tokens) / total,
            "rows_per_s": sum(rows) / total, "ms_per_step": 1e3 * total / len(times)}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="target spec for the build")
    parser.add_argument("--draft", default="smollm2-135m@layers=2", help="draft spec (consumer)")
    parser.add_argument("--cache", default=None, help="existing cache root (skips the build)")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-files", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--batch-seqs", type=int, default=16, help="sequences per read/train batch")
    parser.add_argument("--read-batches", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=2, help="timed steps (+1 warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the caches here (default: temp)")
    parser.add_argument("--out", default=str(RESULTS / "cache_io.json"))
    args = parser.parse_args(argv)

    from adaspec import models
    from adaspec.build import resolve_dtype
    from adaspec.config import build_config
    from cache_tools import schema, store

    info = machine_info()
    tmp = tempfile.TemporaryDirectory(prefix="bench-io-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    task, split = args.task, args.split

    # 1. One model pass (or an existing cache) -> reference rows.
    t0 = time.perf_counter()
    if args.cache is None:
        base = work / "built-float16-plain"
        cfg = build_config(overrides={
            "models.target": args.model, "data.task": task, "data.split": split,
            "data.data_files": args.data_files, "data.limit": args.limit,
            "data.max_length": args.max_length, "cache.topk": args.topk,
            "cache.batch_tokens": args.batch_tokens, "cache.cache": str(base),
            "cache.sparse": "topk", "cache.value_encoding": "float16",
            "cache.id_encoding": "plain"})
        ref = build_reference(cfg)
        reference = "float32 top-K rows of the build's model pass"
    else:
        base = Path(args.cache)
        existing = store.CacheReader(str(base), task, split)
        ref = existing.target_rows(0, existing.n_label_rows)
        reference = f"decoded rows of {base}"
    build_seconds = time.perf_counter() - t0
    base_reader = store.CacheReader(str(base), task, split)
    n_rows, k = ref["ids"].shape
    vocab = int(base_reader.manifest["vocab_size"])
    built = base_reader.target_rows(0, n_rows)
    if not np.array_equal(canonical(built["ids"], built["logprobs"])[0],
                          canonical(ref["ids"], ref["logprobs"])[0]):
        raise SystemExit("the kept rows do not match the built cache; the comparison is void")
    print(f"{n_rows} label rows, K={k}, V={vocab}; reference: {reference} ({build_seconds:.0f} s)")

    # 2-3. Four encodings, sizes.
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
    same = None
    if args.cache is None:
        same = folder_bytes(base / task / split / schema.TARGET) == folder_bytes(
            Path(combos["float16/plain"]["root"]) / task / split / schema.TARGET)

    # 4. Fidelity, also through a real loss: the untrained draft's sparse fKL per label token.
    for name in combos:
        combos[name]["fidelity"] = fidelity(ref, decoded[name], decoded["float16/plain"])
    dtype = resolve_dtype("auto", torch.device("cpu"))
    t0 = time.perf_counter()
    draft, tokenizer = models.load_model(args.draft, dtype=dtype)
    draft_load = time.perf_counter() - t0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs, masks = [], []
    for i in range(base_reader.n_sequences):
        s, m = base_reader.sequence(i)
        seqs.append(s)
        masks.append(m)
    candidates, candidate_rows = {}, {}
    shard_rows = combos["uint8q/delta"]["shard_rows"]
    chunk_rows = combos["uint8q/delta"]["chunk_rows"]
    for name, (rule, threshold) in CANDIDATES.items():
        candidates[name], candidate_rows[name] = per_token_k(ref, rule, threshold, vocab,
                                                             shard_rows, chunk_rows)
    losses = draft_losses(draft, seqs, masks, {"float32": ref, **decoded, **candidate_rows},
                          pad_id, vocab, args.batch_tokens)
    for name, entry in [*((n, combos[n]["fidelity"]) for n in combos), *candidates.items()]:
        diff = np.abs(losses[name] - losses["float32"])
        entry.update({
            "draft_fkl_mean": float(losses[name].mean()),
            "draft_fkl_float32_mean": float(losses["float32"].mean()),
            "draft_fkl_abs_diff_mean": float(diff.mean()),
            "draft_fkl_abs_diff_max": float(diff.max()),
            "draft_fkl_abs_diff_mean_over_loss": float(diff.mean() / losses["float32"].mean()),
            "draft_fkl_rel_diff_of_mean": float(abs(losses[name].mean() / losses["float32"].mean()
                                                    - 1)),
        })

    # 5. Reading vs consuming.
    rng = np.random.default_rng(args.seed)
    n_seq = base_reader.n_sequences
    size = min(args.batch_seqs, n_seq)
    batches = [rng.choice(n_seq, size, replace=False) for _ in range(args.read_batches)]
    for combo in combos.values():
        root = Path(combo["root"])
        drop_page_cache(root)
        t0 = time.perf_counter()
        reader = store.CacheReader(str(root), task, split)
        open_s = time.perf_counter() - t0
        cold = read_batches(reader, batches)
        warm = read_batches(reader, batches)
        once = read_batches_opened_once(reader, batches)
        combo["read"] = {"open_seconds_cold": open_s, "cold": cold, "warm": warm,
                         "warm_arrays_opened_once": once}
    consume = train_steps(draft, base_reader, batches, args.train_steps, pad_id, vocab)
    for combo in combos.values():
        for mode in ("cold", "warm", "warm_arrays_opened_once"):
            combo["read"][mode]["ratio_rows_read_over_consumed"] = (
                combo["read"][mode]["rows_per_s"] / consume["rows_per_s"])

    # Files per 1e6 label tokens at the default shard size: one file per shard and row array,
    # one `_done` entry per shard, plus metadata; sequences at their share of tokens.
    shard_rows = schema.DEFAULT_SHARD_ROWS
    shards = math.ceil(1e6 / shard_rows)
    row_arrays = len(combos["uint8q/delta"]["arrays"]) - 1  # without _done
    target_files = shards * (row_arrays + 1) + (row_arrays + 1) + 1
    tokens_total = int(base_reader.offsets[-1])
    seq_tokens_per_m = 1e6 * tokens_total / n_rows
    seq_chunks = math.ceil(seq_tokens_per_m / schema.SEQUENCE_CHUNK)
    seq_files = 2 * seq_chunks + 3 + 6  # input_ids + label_mask chunks, small arrays, metadata
    files = {"shard_rows": shard_rows, "chunk_rows": schema.DEFAULT_CHUNK_ROWS,
             "target_stage_files_per_1e6_label_tokens": target_files,
             "sequences_files_per_1e6_label_tokens": seq_files,
             "total_per_1e6_label_tokens": target_files + seq_files,
             "counted_here": {n: c["files_target_stage"] for n, c in combos.items()}}

    # Tables.
    dense, raw_topk = vocab * 2, 4 * k
    print()
    print(format_table(
        ["encoding", "ids B/tok", "logprobs B/tok", "tail B/tok", "total B/tok", "compression",
         "vs dense fp16", "vs raw 4K B", f"<= {GOAL_BYTES:.0f}?"],
        [[n, c["bytes_per_label_token"]["ids"], c["bytes_per_label_token"]["logprobs"],
          c["bytes_per_label_token"]["tail_logmass"], c["bytes_per_label_token"]["total"],
          c["compression_ratio"], dense / c["bytes_per_label_token"]["total"],
          raw_topk / c["bytes_per_label_token"]["total"],
          "yes" if c["bytes_per_label_token"]["total"] <= GOAL_BYTES else "no"]
         for n, c in combos.items()]))
    print()
    print(format_table(
        ["encoding", "max|dp|", "mean|dp|", "KL coarse vs f32", "KL coarse vs f16",
         "draft fKL |diff| mean", "|diff|/loss", "rel diff of mean"],
        [[n, c["fidelity"]["max_abs_err_p"], c["fidelity"]["mean_abs_err_p"],
          c["fidelity"]["coarse_kl_vs_float32_mean"], c["fidelity"]["coarse_kl_vs_float16_mean"],
          c["fidelity"]["draft_fkl_abs_diff_mean"],
          c["fidelity"]["draft_fkl_abs_diff_mean_over_loss"],
          c["fidelity"]["draft_fkl_rel_diff_of_mean"]]
         for n, c in combos.items()]))
    print(f"(draft fKL vs float32 target, mean {losses['float32'].mean():.4f} nats/token)")
    print()
    print(format_table(
        ["candidate, uint8q/delta + empty slots", "total B/tok", "mean K", "mass to tail max",
         "draft fKL |diff| mean", "|diff|/loss", "rel diff of mean", f"<= {GOAL_BYTES:.0f}?"],
        [[n, c["bytes_per_label_token"]["total"], c["mean_k"], c["mass_moved_to_tail_max"],
          c["draft_fkl_abs_diff_mean"], c["draft_fkl_abs_diff_mean_over_loss"],
          c["draft_fkl_rel_diff_of_mean"],
          "yes" if c["bytes_per_label_token"]["total"] <= GOAL_BYTES else "no"]
         for n, c in candidates.items()]))
    print()
    rows_table = []
    for n, c in combos.items():
        for mode in ("cold", "warm", "warm_arrays_opened_once"):
            r = c["read"][mode]
            rows_table.append([f"{n} {mode}", r["ms_per_batch_median"], r["rows_per_s"],
                               r["tokens_per_s"], r["ratio_rows_read_over_consumed"]])
    rows_table.append([f"draft step ({args.draft}, fwd+bwd+AdamW)", consume["ms_per_step"],
                       consume["rows_per_s"], consume["tokens_per_s"], 1.0])
    print(format_table([f"read {size}-sequence batches", "ms/batch", "label rows/s", "tokens/s",
                        "read/consume"], rows_table))
    print(f"\nfiles per 1e6 label tokens (shard_rows={shard_rows}): target "
          f"{target_files}, sequences {seq_files}, total {target_files + seq_files}")
    print(f"float16/plain rewrite byte-identical to the build's own: {same}")
    meets = [n for n, c in combos.items() if c["bytes_per_label_token"]["total"] <= GOAL_BYTES]
    print(f"<= {GOAL_BYTES:.0f} B/label token at K={k}: {', '.join(meets) or 'none'}")

    payload = {
        "benchmark": "cache_io",
        "machine": info,
        "settings": vars(args),
        "data": {"label_rows": n_rows, "k": k, "vocab_size": vocab, "sequences": n_seq,
                 "tokens": tokens_total, "reference": reference,
                 "model_pass_seconds": build_seconds, "draft_load_seconds": draft_load},
        "baselines_bytes_per_label_token": {"dense_fp16_logits": dense,
                                            "raw_uint16_ids_fp16_values": raw_topk,
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
    }
    write_json(Path(args.out), payload)
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
