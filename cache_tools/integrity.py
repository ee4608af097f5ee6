"""What a cache's reader checks of what it reads, and `verify` of everything: the same checks.

- Files: each chunk or shard file's SHA-256 is recorded in the manifest when its stage (or its
  shard) is written (`Stage.files`: key under the split -> hex), and a reader compares a file
  once per process before it decodes rows from it. crc32c only says a chunk is intact; the
  digest says it is the chunk written there (not the next shard, the same shard of another
  cache, or `loss_rkl` in place of `loss_fkl`).
- Metadata: an array's dtype, shape and codecs must be the format's (`check_array`): a
  zarr.json edited to another dtype, a shrunk shape or a codec that would unpickle (numcodecs'
  pickle codec) is refused before a chunk is decoded.
- Values: ids inside the vocabulary, log-probs <= 0, top-K + tail mass 1 within the encoding's
  tolerance, sampled counts adding up to K, finite reference losses (`target_problem`,
  `ref_problem`, `sequence_problem`): `verify` refuses what these refuse, and so do the readers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import zarr
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
    ZstdCodec,
)
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cache_tools import schema

# |sum_k p_k + p_tail - 1| allowed per row, by how the values are stored.
MASS_TOLERANCE = {"float16": 5e-3, "uint8q": 6e-2}

# Codecs that only (de)compress and checksum; anything else (a numcodecs pickle codec...) is
# refused before a chunk is decoded.
SAFE_CODECS = (BytesCodec, BloscCodec, Crc32cCodec, ZstdCodec, GzipCodec, TransposeCodec,
               ShardingCodec)

SEQUENCE_DTYPES = {"label_mask": np.dtype(bool), "offsets": np.dtype(np.int64),
                   "label_offsets": np.dtype(np.int64), "source_index": np.dtype(np.int64),
                   "texts": np.dtype(np.uint8), "text_offsets": np.dtype(np.int64)}


# ---------------------------------------------------------------------------------------------
# Files


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_keys(array: zarr.Array, start: int = 0, stop: int | None = None
              ) -> Iterator[tuple[str, str, int, int]]:
    """(key under the split group, key in the store, first row, end row) of each file holding
    rows [start, stop)."""
    stop = array.shape[0] if stop is None else stop
    per = (array.shards or array.chunks)[0]
    path = array.store_path.path  # <task>/<split>/<stage...>/<name>
    under_split = path.split("/", 2)[2]
    tail = (0,) * (len(array.shape) - 1)
    for i in range(start // per, -(-stop // per) if stop > start else start // per):
        chunk = array.metadata.encode_chunk_key((i, *tail))
        yield (f"{under_split}/{chunk}", f"{path}/{chunk}", i * per,
               min(array.shape[0], (i + 1) * per))


def read_file(array: zarr.Array, key: str) -> bytes | None:
    """The stored bytes of one of the array's files (None when absent)."""
    buffer = sync(array.store_path.store.get(key, default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def digests(array: zarr.Array, start: int = 0, stop: int | None = None) -> dict[str, str]:
    """SHA-256 of the files holding rows [start, stop), by key under the split group."""
    out = {}
    for name, key, _, _ in file_keys(array, start, stop):
        data = read_file(array, key)
        if data is not None:
            out[name] = sha256(data)
    return out


# ---------------------------------------------------------------------------------------------
# Metadata


def expected_dtype(stage: str, name: str, params: dict, vocab_size: int) -> np.dtype | None:
    if stage == schema.SEQUENCES:
        if name == "input_ids":
            return schema.id_dtype(vocab_size)
        return SEQUENCE_DTYPES.get(name)
    arrays = schema.stage_arrays(stage, params, vocab_size)
    return arrays[name].dtype if name in arrays else None


def array_problem(array: zarr.Array, dtype: np.dtype | None, rows: int | None,
                  width: int | None = None) -> str | None:
    """Why the array's metadata is not the format's (dtype, rows, width, codecs), or None."""
    codecs = list(array.metadata.codecs)
    for codec in codecs:
        if isinstance(codec, ShardingCodec):
            codecs += list(codec.codecs) + list(codec.index_codecs)
    unsafe = [type(c).__name__ for c in codecs if not isinstance(c, SAFE_CODECS)]
    if unsafe:
        return f"codec {unsafe[0]} is not one the format uses"
    if dtype is not None and np.dtype(array.dtype) != dtype:
        return f"dtype {np.dtype(array.dtype)}, the format stores {dtype}"
    if rows is not None and array.shape[0] != rows:
        return f"{array.shape[0]} rows, the manifest's counts say {rows}"
    if width is not None and (len(array.shape) != 2 or array.shape[1] != width):
        return f"shape {array.shape}, rows of {width} entries expected"
    return None


# ---------------------------------------------------------------------------------------------
# Values


def sequence_problem(offsets: np.ndarray, label_offsets: np.ndarray, n_tokens: int,
                     counts: dict) -> str | None:
    """Offsets that do not cut `n_tokens` tokens into the manifest's sequences and label rows."""
    if len(offsets) != len(label_offsets) or len(offsets) < 1:
        return "offsets and label_offsets have different lengths"
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) <= 0):
        return f"offsets: not increasing from 0 to {n_tokens}"
    if label_offsets[0] != 0 or np.any(np.diff(label_offsets) < 0):
        return "label_offsets: not increasing from 0"
    for key, have in (("sequences", len(offsets) - 1), ("tokens", n_tokens),
                      ("label_tokens", int(label_offsets[-1]))):
        if key in counts and int(counts[key]) != have:
            return f"the manifest counts {counts[key]} {key}, the arrays hold {have}"
    return None


def token_problem(ids: np.ndarray, vocab_size: int) -> str | None:
    if len(ids) and int(ids.max()) >= vocab_size:
        return f"token id {int(ids.max())} outside the vocabulary ({vocab_size})"
    return None


def target_problem(rows: dict[str, np.ndarray], params: dict, vocab_size: int) -> str | None:
    """Decoded target rows (`schema.decode_target_rows`) that break what the format promises."""
    ids, logprobs = rows["ids"], rows["logprobs"]
    if ids.shape != logprobs.shape:
        return f"ids {ids.shape} and logprobs {logprobs.shape} disagree"
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        return f"token id outside the vocabulary ({vocab_size})"
    if not np.all(logprobs <= 1e-3):
        return "log-prob above 0 (or nan)"
    encoding = params.get(schema.VALUE_ENCODING, "float16")
    if "tail_logmass" in rows:
        mass = (np.exp(logprobs.astype(np.float64)).sum(-1)
                + np.exp(rows["tail_logmass"].astype(np.float64)))
        worst = float(np.max(np.abs(mass - 1.0))) if len(mass) else 0.0
        if not worst <= MASS_TOLERANCE[encoding]:
            return f"top-K mass + tail = 1 +- {worst:.3g} (tolerance {MASS_TOLERANCE[encoding]})"
    if "counts" in rows and np.any(rows["counts"].sum(-1) != params.get(schema.K)):
        return f"sample counts do not add up to {params.get(schema.K)}"
    return None


def ref_problem(values: np.ndarray) -> str | None:
    return None if np.all(np.isfinite(values)) else "non-finite loss"
