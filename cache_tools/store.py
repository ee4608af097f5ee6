"""The logit cache store's API in one place: `CacheWriter`/`StageWriter` (writer.py), `CacheReader`
(reader.py) and the Zarr-level helpers (zarr_io.py: opening a root, listing splits, reading rows
and checking chunks with named errors, the build lock)."""

from cache_tools.reader import CacheReader
from cache_tools.writer import CacheWriter, StageWriter
from cache_tools.zarr_io import (
    METADATA_ERRORS,
    STORE_EVERY_CHUNK,
    build_lock,
    check_local_root,
    check_params,
    check_stored,
    is_local,
    list_splits,
    member,
    metadata_error,
    open_root,
    read_rows,
    split_path,
)

__all__ = [
    "METADATA_ERRORS", "STORE_EVERY_CHUNK", "CacheReader", "CacheWriter", "StageWriter",
    "build_lock", "check_local_root", "check_params", "check_stored", "is_local", "list_splits",
    "member", "metadata_error", "open_root", "read_rows", "split_path",
]
