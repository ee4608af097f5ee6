"""A group's members (arrays, groups) read with a one-line error when their metadata
(zarr.json) is deleted, truncated or garbled: Zarr would raise a JSON or key error from deep
inside."""

from __future__ import annotations

import zarr

from cache_tools.errors import CacheError
from cache_tools.location import is_local
from cache_tools.root import unreachable

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
