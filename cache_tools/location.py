"""Where a cache lives: a local folder, or an object store URL (`s3://bucket/prefix`, any
fsspec URL). Credentials and endpoints come from the usual environment of the store's client
(for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    url: str
    """The root as given (a local path, `file://...`, or `<protocol>://...`)."""
    protocol: str
    """"file" for a local folder."""
    path: str
    """The local path, or `bucket/prefix` (the URL without its protocol)."""

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def local_path(self) -> Path:
        return Path(self.path)

    def filesystem(self):
        """The fsspec filesystem of a remote location (fsspec keeps one per protocol)."""
        return _filesystem(self.protocol)


def is_local(root: str) -> bool:
    return "://" not in str(root) or str(root).startswith("file://")


def local_path(root: str) -> Path:
    return Path(str(root).removeprefix("file://"))


def location_of(root: str) -> Location:
    root = str(root)
    protocol, sep, rest = root.partition("://")
    if not sep or protocol == "file":
        path = rest if sep else root
        return Location(root, "file", path)
    return Location(root.rstrip("/"), protocol, rest.rstrip("/"))


def _filesystem(protocol: str):
    import fsspec

    return fsspec.filesystem(protocol)
