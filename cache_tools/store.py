"""The logit cache store's API in one place: `CacheWriter`/`StageWriter` (writer.py), `CacheReader`
(reader.py) and the helpers around them: opening a root (root.py), listing splits (splits.py),
reading rows and checking chunks (chunks.py) and metadata (metadata.py) with named errors, where a
cache lives (location.py), comparing settings (manifest.py) and the build lock (lease.py)."""

from cache_tools.chunks import STORE_EVERY_CHUNK, check_stored, read_rows
from cache_tools.lease import build_lock
from cache_tools.location import is_local
from cache_tools.manifest import check_params
from cache_tools.metadata import METADATA_ERRORS, member, metadata_error
from cache_tools.reader import CacheReader
from cache_tools.root import check_local_root, open_root
from cache_tools.splits import list_splits, split_path
from cache_tools.writer import CacheWriter, StageWriter

__all__ = [
    "METADATA_ERRORS", "STORE_EVERY_CHUNK", "CacheReader", "CacheWriter", "StageWriter",
    "build_lock", "check_local_root", "check_params", "check_stored", "is_local", "list_splits",
    "member", "metadata_error", "open_root", "read_rows", "split_path",
]
