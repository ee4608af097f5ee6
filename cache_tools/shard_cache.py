"""A bounded local disk cache of a remote store's shard files, for readers of a cache on an
object store (as MosaicML Streaming and WebDataset keep recently used shards locally).

`LocalShardCache` wraps a Zarr store: a chunk or shard object (a key with a `/c/` part) is
fetched whole, once, into a local folder, and every byte range Zarr asks of it (a shard's index,
its chunks) is served from that file; metadata (`zarr.json`) and listings go to the store, so a
reader always sees the current manifest. When the folder holds more than `max_bytes`, the least
recently used files are dropped. Files are written whole (temporary name, then rename; leftovers
of a killed reader are removed on open), and named by the store's URL, the object's key and its
version (the ETag, else size and modification time, asked once per object and process), so two
caches can share a folder and a rebuilt stage is fetched anew.

What a file holds is checked by the reader (`CacheReader`: its SHA-256 against the manifest's);
one that fails is dropped here (`drop`) and fetched again, so a damaged or replaced local file
is never believed and never blamed on the store. A local folder that cannot be written (read
only, full) only costs the caching: the fetched bytes are served from memory.

Reading ahead is the stream's (its prefetch thread reads the next batches' blocks, and Zarr
fetches a block's shards concurrently). `stats` counts requests served from local files (hits),
objects fetched (misses), bytes fetched and files evicted.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import WrapperStore

from cache_tools.errors import CacheError


def is_chunk_key(key: str) -> bool:
    return "/c/" in f"/{key}"


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix:] if byte_range.suffix else b""
    raise TypeError(f"unknown byte request {byte_range!r}")


class LocalShardCache(WrapperStore):
    """A read-only view of `store` whose chunk/shard objects are cached whole on local disk."""

    def __init__(self, store, folder: str | Path, max_bytes: int):
        super().__init__(store)
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cannot create the local shard cache {self.folder} "
                             f"({err.strerror}); set --local-cache-dir, or --local-cache-mb 0"
                             ) from None
        for leftover in self.folder.glob(".*.shard.*"):  # a reader killed mid-download
            leftover.unlink(missing_ok=True)
        self.url = f"{getattr(store.fs, 'protocol', ('?',))[0]}://{store.path}"
        self._versions: dict[str, str] = {}
        self.max_bytes = int(max_bytes)
        self.stats = {"hits": 0, "misses": 0, "bytes_fetched": 0, "evicted": 0}
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # local name -> size, LRU order
        for path in sorted(self.folder.glob("*.shard"), key=lambda p: p.stat().st_atime):
            self._files[path.name] = path.stat().st_size
        self._evict()

    def _with_store(self, store):
        return type(self)(store, self.folder, self.max_bytes)

    async def _name(self, key: str) -> str | None:
        """The local file name of the object's current version; None if the object is absent."""
        version = self._versions.get(key)
        if version is None:
            try:
                info = await self._store.fs._info(f"{self._store.path}/{key}")
            except FileNotFoundError:
                return None
            version = str(info.get("ETag") or (info.get("size"), info.get("LastModified"),
                                                info.get("mtime")))
            self._versions[key] = version
        return self._file_name(key, version)

    def _file_name(self, key: str, version: str) -> str:
        blob = f"{self.url}\n{key}\n{version}".encode()
        return hashlib.sha256(blob).hexdigest()[:32] + ".shard"

    def _touch(self, name: str, size: int) -> None:
        with self._lock:
            self._files[name] = size
            self._files.move_to_end(name)

    def _evict(self) -> None:
        with self._lock:
            total = sum(self._files.values())
            while total > self.max_bytes and len(self._files) > 1:
                name, size = self._files.popitem(last=False)
                (self.folder / name).unlink(missing_ok=True)
                total -= size
                self.stats["evicted"] += 1

    async def _whole(self, key: str) -> bytes | None:
        """The object's bytes, from the local file or fetched into it."""
        name = await self._name(key)
        if name is None:
            return None
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError:  # absent, or unreadable: fetched again
            data = None
        if data is not None:
            self.stats["hits"] += 1
            self._touch(name, len(data))
            return data
        buffer = await self._store.get(key, default_buffer_prototype())
        if buffer is None:
            return None
        data = buffer.to_bytes()
        self.stats["misses"] += 1
        self.stats["bytes_fetched"] += len(data)
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:  # a read-only or full local folder: serve it uncached
            tmp.unlink(missing_ok=True)
            return data
        self._touch(name, len(data))
        self._evict()
        return data

    def drop(self, key: str) -> None:
        """Forget the local copy of `key` (and its version), so the next read fetches it."""
        version = self._versions.pop(key, None)
        if version is None:
            return
        name = self._file_name(key, version)
        with self._lock:
            self._files.pop(name, None)
        try:
            (self.folder / name).unlink(missing_ok=True)
        except OSError:
            pass

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not is_chunk_key(key):
            return await self._store.get(key, prototype, byte_range)
        data = await self._whole(key)
        if data is None:
            return None
        return prototype.buffer.from_bytes(_slice(data, byte_range))

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    @property
    def supports_writes(self) -> bool:
        return False

    @property
    def read_only(self) -> bool:
        return True
