"""Opening a cache's root group: refusing what is not a cache (a file, a Zarr v2 store, a
foreign folder, another format or version), creating a new root, a remote root seen through the
local shard cache, and one-line errors for an object store that cannot be reached or whose
client is missing."""

from __future__ import annotations

import warnings

import zarr

from cache_tools import schema
from cache_tools.errors import CacheError
from cache_tools.location import is_local, local_path

# Caches built by earlier versions may hold `.generate-*` staging folders and `.build-*.lock`
# files beside their groups (staging now lives beside the cache folder, the lock is a lease
# group); Zarr warns about such entries when it walks the root. Nothing else of ours is stray.
warnings.filterwarnings("ignore", message=r"Object at \.(generate-|build-).* is not recognized "
                        "as a component of a Zarr hierarchy", category=UserWarning)

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
        if set(group.keys()) - {schema.LEASES}:  # another build's process may have leased already
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
