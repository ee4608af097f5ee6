"""A cache's splits: the `<task>/<split>` path of each, and finding those a root holds."""

from __future__ import annotations

import zarr

from cache_tools.metadata import METADATA_ERRORS, metadata_error


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
