"""The logit cache format in one place: names, dtypes, chunk shapes, codecs and the version.

Layout of a cache root (a Zarr v3 group; any Zarr v3 reader can open it):

    <root>/                         attrs: {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
      <task>/<split>/               attrs: {"manifest": {...}, "manifest_sha256": "<hex>"}
                                    (see `new_manifest`; the digest: `manifest.digest`)
        sequences/                  ragged token sequences, no padding stored
          input_ids     (T,)   uint16|uint32   all sequences concatenated
          label_mask    (T,)   bool            True where the token is a response (label) token
          offsets       (S+1,) int64           sequence s is input_ids[offsets[s]:offsets[s+1]]
          label_offsets (S+1,) int64           its label rows: label_offsets[s]:label_offsets[s+1]
          source_index  (S,)   int64           row of the task's split each sequence came from
          texts         (B,)   uint8           optional: the UTF-8 record each sequence was made
                                               from (task chat: its conversation row, as JSON)
          text_offsets  (S+1,) int64           record s: texts[text_offsets[s]:text_offsets[s+1]]
        target/                     one row per label token, in sequence order
          ids           (N, K) uint16|uint32   top-K token ids (or sampled ids, mode "sample");
                                               "delta": first kept, rest sorted, differences
          logprobs      (N, K) float16|uint8   target log-probs of those ids (full log-softmax)
          tail_logmass  (N,)   float32         log(1 - sum_k p_k), mode "topk" (-inf: nothing left)
          counts        (N, K) uint16          draws per id, mode "sample" (0 = padding slot)
          _done         (n_shards,) uint8      1 once a shard's rows are written (resume marker)
        ref/<name>/                 per-token losses of a reference draft against the cached target
          loss_<div>    (N,)   float32         one per divergence (fkl, rkl, tvd, jsd)
          _done         (n_shards,) uint8

A label row r of sequence s is the distribution predicting input_ids[offsets[s] + j] from the
tokens before it, where j runs over the positions with label_mask set, in order.

Rows are written in whole shards (`shard_rows` rows, one file per shard and array), each holding
chunks of `chunk_rows` rows; every chunk is Blosc-zstd compressed and crc32c checksummed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

FORMAT_NAME = "adaspec-logit-cache"
FORMAT_VERSION = 1

SEQUENCES = "sequences"
TARGET = "target"
REF_PREFIX = "ref"
DONE = "_done"
LEASES = "_leases"  # the root's group of build leases (`lease.py`)

SEQUENCE_ARRAYS = ("input_ids", "label_mask", "offsets", "label_offsets", "source_index")
TEXT_ARRAYS = ("texts", "text_offsets")  # optional, both or neither
SPARSE_MODES = ("topk", "sample")
VALUE_ENCODINGS = ("float16", "uint8q")
ID_ENCODINGS = ("plain", "delta")
DIVERGENCES = ("fkl", "rkl", "tvd", "jsd")

STATUS_BUILDING = "building"
STATUS_COMPLETE = "complete"

# Stage parameters a reader needs (the rest of a stage's params are its builder's business).
TOKENIZER_FINGERPRINT = "tokenizer_fingerprint"  # sequences: which tokenizer made the ids
MODE, K, VALUE_ENCODING, ID_ENCODING = "mode", "k", "value_encoding", "id_encoding"  # target

DEFAULT_SHARD_ROWS = 16384
DEFAULT_CHUNK_ROWS = 1024
SEQUENCE_CHUNK = 1 << 16

# uint8q: log-probs quantised in 1/16-nat steps, clipped at 255/16 ~ 15.9 nats (p ~ 1.2e-7).
UINT8Q_STEP = 1.0 / 16.0


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def value_dtype(encoding: str) -> np.dtype:
    if encoding == "float16":
        return np.dtype(np.float16)
    if encoding == "uint8q":
        return np.dtype(np.uint8)
    raise ValueError(f"unknown value encoding {encoding!r}; choose one of {VALUE_ENCODINGS}")


def encode_logprobs(logprobs: np.ndarray, encoding: str) -> np.ndarray:
    """(N, K) float32 log-probs -> stored values of `value_dtype(encoding)`."""
    if encoding == "float16":
        # Log-probs below float16's range would become -inf; -60 nats is p ~ 1e-26.
        return np.maximum(logprobs, -60.0).astype(np.float16)
    if encoding == "uint8q":
        q = np.rint(-np.asarray(logprobs, dtype=np.float32) / UINT8Q_STEP)
        return np.clip(q, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown value encoding {encoding!r}; choose one of {VALUE_ENCODINGS}")


def decode_logprobs(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Stored values -> (N, K) float32 log-probs."""
    if encoding == "float16":
        return stored.astype(np.float32)
    if encoding == "uint8q":
        return stored.astype(np.float32) * np.float32(-UINT8Q_STEP)
    raise ValueError(f"unknown value encoding {encoding!r}; choose one of {VALUE_ENCODINGS}")


def encode_rows(ids: np.ndarray, values: np.ndarray, counts: np.ndarray | None,
                encoding: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Order a row's entries for storage. "plain": as given (top-K: largest first).

    "delta": the first entry (the top-1 in top-K mode) stays first with its id as is, so the
    target's greedy token is exact whatever the value rounding; the other ids are sorted and
    stored as [smallest, differences...], small numbers that compress far better than random
    ids. Values and counts follow the same order.
    """
    if encoding == "plain":
        return ids, values, counts
    if encoding != "delta":
        raise ValueError(f"unknown id encoding {encoding!r}; choose one of {ID_ENCODINGS}")
    order = np.argsort(ids[:, 1:], axis=-1, kind="stable") + 1  # (N, K-1) the rest, by id
    order = np.concatenate([np.zeros((len(ids), 1), dtype=order.dtype), order], axis=-1)
    ids = np.take_along_axis(ids, order, -1)
    values = np.take_along_axis(values, order, -1)
    if counts is not None:
        counts = np.take_along_axis(counts, order, -1)
    stored = ids.copy()
    stored[:, 2:] = ids[:, 2:] - ids[:, 1:-1]
    return stored, values, counts


def decode_ids(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Stored ids -> (N, K) int64 token ids (entries in storage order)."""
    if encoding == "plain":
        return stored.astype(np.int64)
    if encoding == "delta":
        ids = stored.astype(np.int64)
        ids[:, 1:] = np.cumsum(ids[:, 1:], axis=-1)
        return ids
    raise ValueError(f"unknown id encoding {encoding!r}; choose one of {ID_ENCODINGS}")


def encode_target_rows(rows: dict[str, np.ndarray], value_encoding: str, id_encoding: str,
                       vocab_size: int) -> dict[str, np.ndarray]:
    """Computed target rows -> the stored arrays (inverse of `decode_target_rows`).

    rows: ids (N, K) int64, logprobs (N, K) float32, and tail_logmass (N,) float32 (mode topk)
    or counts (N, K) float32/int (mode sample).
    """
    out = dict(rows)
    out["ids"], out["logprobs"], counts = encode_rows(
        out["ids"], out["logprobs"], out.get("counts"), id_encoding
    )
    out["logprobs"] = encode_logprobs(out["logprobs"], value_encoding)
    out["ids"] = out["ids"].astype(id_dtype(vocab_size))
    if counts is not None:
        out["counts"] = counts.astype(np.uint16)
    if "tail_logmass" in out:
        out["tail_logmass"] = out["tail_logmass"].astype(np.float32)
    return out


def decode_target_rows(stored: dict[str, np.ndarray], params: dict) -> dict[str, np.ndarray]:
    """Stored target arrays -> ids (N, K) int64, logprobs (N, K) float32, and tail_logmass (N,)
    float32 or counts (N, K) float32. `params` is the target stage's (see `target_arrays`)."""
    rows = {
        "ids": decode_ids(stored["ids"], params.get(ID_ENCODING, "plain")),
        "logprobs": decode_logprobs(stored["logprobs"], params.get(VALUE_ENCODING, "float16")),
    }
    for name in ("tail_logmass", "counts"):
        if name in stored:
            rows[name] = stored[name].astype(np.float32)
    return rows


@dataclass(frozen=True)
class RowArray:
    """One per-row array of a stage: `width` None for (N,), else (N, width)."""

    dtype: np.dtype
    width: int | None = None
    fill_value: Any = 0


def target_arrays(mode: str, k: int, value_encoding: str, vocab_size: int) -> dict[str, RowArray]:
    """The arrays of a target stage (see the layout above)."""
    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {SPARSE_MODES}")
    arrays = {"ids": RowArray(id_dtype(vocab_size), k),
              "logprobs": RowArray(value_dtype(value_encoding), k)}
    if mode == "topk":
        arrays["tail_logmass"] = RowArray(np.dtype(np.float32), None, float("-inf"))
    else:
        arrays["counts"] = RowArray(np.dtype(np.uint16), k)
    return arrays


def stage_arrays(stage: str, params: dict, vocab_size: int) -> dict[str, RowArray]:
    """The arrays of a row stage (target or `ref/<name>`) with its `params`."""
    if stage == TARGET:
        return target_arrays(params.get(MODE), int(params.get(K, 1)),
                             params.get(VALUE_ENCODING, "float16"), vocab_size)
    return ref_arrays()


def encode_stage_rows(stage: str, params: dict, rows: dict[str, np.ndarray],
                      vocab_size: int) -> dict[str, np.ndarray]:
    """Computed rows of a row stage -> its stored arrays (target: `encode_target_rows` with the
    stage's encodings; a reference's losses: float32)."""
    if stage == TARGET:
        return encode_target_rows(rows, params.get(VALUE_ENCODING, "float16"),
                                  params.get(ID_ENCODING, "plain"), vocab_size)
    return {name: np.asarray(values, dtype=np.float32) for name, values in rows.items()}


def stage_array_names(stage: str, params: dict, vocab_size: int) -> list[str]:
    """The arrays a complete stage holds, by the format (a listing of the folder would silently
    drop an array whose metadata was deleted); `_done` markers not included."""
    if stage == SEQUENCES:
        return list(SEQUENCE_ARRAYS)
    return list(stage_arrays(stage, params, vocab_size))


def ref_arrays() -> dict[str, RowArray]:
    """The arrays of a `ref/<name>` stage: one per-token loss per divergence."""
    return {f"loss_{d}": RowArray(np.dtype(np.float32)) for d in DIVERGENCES}


def compressors(dtype: np.dtype) -> list:
    """Blosc-zstd (byte shuffle, or bit shuffle for 1-byte types) then a crc32c checksum."""
    dtype = np.dtype(dtype)
    shuffle = "bitshuffle" if dtype.itemsize == 1 else "shuffle"
    return [
        BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=dtype.itemsize),
        Crc32cCodec(),
    ]


def ref_group_name(name: str) -> str:
    return f"{REF_PREFIX}/{name}"
