"""Zarr-level access to a cache store: opening the root (refusing folders that are not caches),
finding its splits, reading rows and checking chunks and metadata with one-line errors that
name what is damaged, and the build lock (a lease object: `lease.py`).

Every chunk of a stage is stored, also one equal to the fill value (`STORE_EVERY_CHUNK`): Zarr
reads an absent chunk as the fill value, so a lost chunk file would read as zeros; here it is
an error (`check_stored`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from cache_tools import schema
from cache_tools.errors import CacheError
from cache_tools.lease import LEASES, Lease
from cache_tools.location import location_of

# Caches built by earlier versions may hold `.generate-*` staging folders and `.build-*.lock`
# files beside their groups (staging now lives beside the cache folder, the lock is a lease
# group); Zarr warns about such entries when it walks the root. Nothing else of ours is stray.
warnings.filterwarnings("ignore", message=r"Object at \.(generate-|build-).* is not recognized "
                        "as a component of a Zarr hierarchy", category=UserWarning)

# Zarr skips writing a chunk that equals the fill value, and reads an absent chunk as the fill
# value: a deleted chunk file would then read as zeros. Every chunk is written, so an absent one
# is damage (`check_stored`).
STORE_EVERY_CHUNK = {"write_empty_chunks": True}


def is_local(root: str) -> bool:
    return "://" not in str(root) or str(root).startswith("file://")


def local_path(root: str) -> Path:
    return Path(str(root).removeprefix("file://"))


OWN_HIDDEN = (".generate-", ".build-")  # what earlier versions left beside the groups


def check_local_root(root: str) -> None:
    """Refuse, before anything is written, a local folder that is not a cache: a file, a Zarr v2
    store, or a non-empty folder without the root's zarr.json."""
    path = local_path(root)
    if not path.exists():
        return
    if not path.is_dir():
        raise CacheError(f"{root} is a file, not a cache folder; pass a folder to --cache")
    if (path / ".zgroup").exists() or (path / ".zarray").exists():
        raise CacheError(f"{root} is a Zarr v2 store; a logit cache is Zarr v3: use a new --cache")
    if (path / "zarr.json").exists():
        return
    foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith(OWN_HIDDEN))
    if foreign:
        raise CacheError(f"{root} is not empty and not a cache (it holds {', '.join(foreign[:3])}"
                         "); use a new or empty --cache folder")


def open_root(root: str, mode: str = "a", local_cache: tuple[str, int] | None = None
              ) -> zarr.Group:
    """Open (or with mode "a", create) a cache root group; refuse folders that are not caches.
    `local_cache` (folder, bytes): read a remote root's shard files through a bounded local
    disk cache (`shard_cache.LocalShardCache`)."""
    if mode == "r" and is_local(root) and not local_path(root).exists():
        raise CacheError(f"no cache at {root}; build one with `adaspec-cache build`")
    if is_local(root):
        check_local_root(root)
    if is_local(root):  # zarr's size queries resolve a relative store path against nothing
        root = str(local_path(root).resolve())
    store = _store_of(root, mode, local_cache)
    try:
        group = zarr.open_group(store, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        if not is_local(root) and mode != "r":
            raise unreachable(root, err) from None
        raise CacheError(f"no cache at {root}; build one with `adaspec-cache build`") from None
    except (ValueError, zarr.errors.ContainsArrayError) as err:
        reason = (str(err).splitlines() or [""])[0][:100]
        raise CacheError(f"{root} is not a Zarr v3 logit cache, or its zarr.json is damaged "
                         f"({type(err).__name__}: {reason})") from None
    except ImportError as err:
        raise missing_client(root, err) from None
    except Exception as err:  # an object store's client: connection, bucket, credentials
        if is_local(root):
            raise
        raise unreachable(root, err) from None
    attrs = dict(group.attrs)
    if not attrs and mode != "r":
        if set(group.keys()) - {LEASES}:  # another build's process may have leased already
            raise CacheError(f"{root} holds a Zarr group that is not a logit cache")
        group.attrs.update({"format": schema.FORMAT_NAME, "format_version": schema.FORMAT_VERSION})
    elif attrs.get("format") != schema.FORMAT_NAME:
        raise CacheError(f"{root} is not a logit cache (no '{schema.FORMAT_NAME}' attribute)")
    elif attrs.get("format_version") != schema.FORMAT_VERSION:
        raise CacheError(
            f"{root} has cache format version {attrs.get('format_version')}, this package reads "
            f"{schema.FORMAT_VERSION}; rebuild it"
        )
    return group


def _store_of(root: str, mode: str, local_cache: tuple[str, int] | None):
    """What zarr opens: the root itself, or a read-only remote store seen through the local
    shard cache."""
    if local_cache is None or mode != "r" or is_local(root):
        return root
    from zarr.storage import FsspecStore

    from cache_tools.shard_cache import LocalShardCache

    folder, max_bytes = local_cache
    try:
        remote = FsspecStore.from_url(root, read_only=True)
    except ImportError as err:
        raise missing_client(root, err) from None
    return LocalShardCache(remote, folder, max_bytes)


def missing_client(root: str, err: ImportError) -> CacheError:
    return CacheError(f"{root} needs the store's fsspec client ({err.name or err}): for s3:// "
                      "install it with `pip install -e '.[s3]'` (s3fs)")


def unreachable(root: str, err: BaseException) -> CacheError:
    """A one-line error for an object store that cannot be reached or written (a wrong endpoint,
    a missing bucket, missing credentials: the store client's first line says which)."""
    reason = (str(err).splitlines() or [""])[0][:160] or type(err).__name__
    return CacheError(f"cannot open the cache {root} ({type(err).__name__}: {reason}); check the "
                      "URL, that the bucket exists, and the store's credentials and endpoint "
                      "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")


def split_path(task: str, split: str) -> str:
    return f"{task}/{split}"


def list_splits(root_group: zarr.Group) -> list[str]:
    """Every `<task>/<split>` path in a cache root that has a manifest; damaged group metadata
    is a one-line CacheError (Zarr would raise a JSON error from deep inside)."""
    found = []
    root = str(root_group.store_path)
    try:
        for task, task_group in sorted(root_group.groups()):
            for split, split_group in sorted(task_group.groups()):
                if "manifest" in split_group.attrs:
                    found.append(f"{task}/{split}")
    except METADATA_ERRORS as err:
        raise metadata_error(root, "(a task or split group)", err) from None
    return found


def check_params(where: str, stored: dict, asked: dict, fix: str) -> None:
    """Refuse, in one line naming the first difference, settings that differ from the store's."""
    for key in sorted(set(stored) | set(asked)):
        if stored.get(key) != asked.get(key):
            raise CacheError(
                f"{where} was built with {key}={stored.get(key)!r} but this run has "
                f"{key}={asked.get(key)!r}; {fix}"
            )


# ---------------------------------------------------------------------------------------------
# Locking


@contextlib.contextmanager
def build_lock(root: str, task: str, split: str, rank: int = 0) -> Iterator[Lease]:
    """Refuse a second build into the same `<task>/<split>` while one runs, on a local folder
    or an object store: each process of a build holds a lease object in the store (`lease.py`);
    a lease whose holder died (on this machine) or stopped renewing it is taken over. Yields
    the lease: call its `check()` before writing (it raises once the lease is lost)."""
    location = location_of(root)
    try:
        open_root(root, "a")  # a foreign folder is refused untouched; the lease sits in a cache
        held = Lease(location, task, split, rank)
        held.acquire()
    except OSError as err:
        raise CacheError(f"cannot write the cache {root} ({err.strerror or err}); a build needs "
                         "a writable --cache") from None
    try:
        yield held
    finally:
        held.release()


# ---------------------------------------------------------------------------------------------
# Reading


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


# What Zarr raises for a deleted, truncated or garbled metadata file (zarr.json).
METADATA_ERRORS = (KeyError, ValueError, FileNotFoundError, OSError, TypeError,
                   zarr.errors.BaseZarrError)


def metadata_error(root: str, where: str, err: BaseException) -> CacheError:
    reason = (str(err).splitlines() or [""])[0][:100]
    return CacheError(
        f"{root}/{where}: metadata (zarr.json) missing or unreadable ({type(err).__name__}"
        f"{': ' + reason if reason else ''}): the store is damaged; run `adaspec-cache verify "
        f"--cache {root}`, then rebuild the damaged stage (`adaspec-cache build ... --rebuild`)"
    )


def member(group: zarr.Group, name: str, root: str):
    """group[name] (an array or group), or a one-line CacheError when its metadata is damaged."""
    try:
        return group[name]
    except METADATA_ERRORS as err:
        raise metadata_error(root, f"{group.path}/{name}".strip("/"), err) from None
    except Exception as err:  # a remote store gone since the cache was opened
        if is_local(root):
            raise
        raise unreachable(root, err) from None


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
