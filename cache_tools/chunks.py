"""Chunks stored and readable, or named in one line: every chunk of a stage is written (also
one equal to the fill value), a missing chunk file is an error, and a row range that cannot be
decoded names its bad chunk.

Zarr skips writing a chunk that equals the fill value, and reads an absent chunk as the fill
value: a lost chunk file would then read as zeros. Here every chunk is written
(`STORE_EVERY_CHUNK`), so an absent one is damage (`check_stored`).
"""

from __future__ import annotations

import numpy as np
import zarr

from cache_tools.errors import CacheError
from cache_tools.location import is_local, local_path

STORE_EVERY_CHUNK = {"write_empty_chunks": True}  # the array config every stage is written with


def read_rows(array: zarr.Array, start: int, stop: int, root: str) -> np.ndarray:
    """array[start:stop], or a one-line CacheError naming the array and the unreadable chunk.

    Corruption surfaces as whatever the codec raises (a checksum mismatch, a Blosc error, a
    truncated shard); on failure each chunk of the range is read alone to name the bad one.
    """
    try:
        return array[start:stop]
    except Exception as err:  # any codec or I/O error means an unreadable chunk
        first_error = err
    chunk_rows = array.chunks[0]
    bad = start // chunk_rows
    for chunk in range(start // chunk_rows, -(-stop // chunk_rows)):
        try:
            array[chunk * chunk_rows : min(array.shape[0], (chunk + 1) * chunk_rows)]
        except Exception as err:  # the chunk that fails alone is the bad one
            bad, first_error = chunk, err
            break
    reason = (str(first_error).splitlines() or [type(first_error).__name__])[0][:120]
    reason = reason.rstrip(". ")
    lo, hi = bad * chunk_rows, min(array.shape[0], (bad + 1) * chunk_rows)
    raise CacheError(
        f"cannot read {root}/{array.path} chunk {bad} (rows {lo}-{hi}): {reason}; run "
        f"`adaspec-cache verify --cache {root}`, then rebuild the damaged stage with "
        "`adaspec-cache build ... --rebuild`"
    ) from None


def check_stored(array: zarr.Array, root: str) -> None:
    """Every chunk (shard) of a complete array must be stored: a missing one is a one-line
    CacheError naming it (Zarr would read it as the fill value, silently)."""
    per = (array.shards or array.chunks)[0]
    stored = -(-array.shape[0] // per) if array.shape[0] else 0
    expected = stored * (per // array.chunks[0])
    if array.nchunks_initialized >= expected:
        return
    missing = "some of its chunk files"
    if is_local(root):
        base = local_path(root) / array.path / "c"
        tail = "/0" * (len(array.shape) - 1)
        for i in range(stored):
            if not (base / f"{i}{tail}").exists():
                rows = f"rows {i * per}-{min(array.shape[0], (i + 1) * per)}"
                missing = f"chunk file c/{i}{tail} ({rows})"
                break
    raise CacheError(
        f"{root}/{array.path} is missing {missing}: the store is damaged (a partial copy?); run "
        f"`adaspec-cache verify --cache {root}`, then rebuild the damaged stage with "
        "`adaspec-cache build ... --rebuild`"
    )
