"""Exclusive builds without a shared filesystem: a lease object inside the cache.

A build of one `<task>/<split>` (each process of it: `rank`) holds a lease, a small object at
`_leases/<task>.<split>.rank<r>/zarr.json` under the cache root. It is a Zarr group whose
attributes hold the lease, so any Zarr reader walking the store sees a valid hierarchy (no stray
files). The lease names its holder (host, pid, a random token) and an expiry; a thread renews it
while the build runs, and it is released (marked so) when the build ends.

Taking it uses the store's conditional writes, so two builders can never both win:
- create-if-absent: S3 `PutObject` with `If-None-Match: *`; locally a hard link of a written
  temporary file (`os.link` fails if the name exists);
- replace-if-unchanged (renew, release, take over): S3 `PutObject` with `If-Match: <ETag>`;
  locally under `flock` on the lease file, checked to be the same file and the same bytes.
A lease is taken over when it was released, has expired, or its holder is a dead process on this
host (a killed build is resumed at once, as with a kernel lock).

`build_lock` is the lock a build runs under: it opens (or creates) the root, refusing a folder that
is not a cache, and holds this process's lease until the build ends.

Clocks: expiry is the holder's wall clock; hosts whose clocks differ by more than a fraction of
`ADASPEC_LEASE_SECONDS` (default 120) could take over a live lease early.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cache_tools.errors import CacheError
from cache_tools.location import Location, location_of
from cache_tools.root import open_root
from cache_tools.schema import LEASES

DEFAULT_SECONDS = 120.0


class Changed(Exception):
    """A conditional write found the object changed (another builder got there first)."""


def lease_seconds() -> float:
    raw = os.environ.get("ADASPEC_LEASE_SECONDS", str(DEFAULT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        raise CacheError(f"ADASPEC_LEASE_SECONDS must be seconds, got {raw!r}") from None
    if not seconds > 0:
        raise CacheError(f"ADASPEC_LEASE_SECONDS must be > 0, got {raw!r}")
    return seconds


def _group_json(attributes: dict | None) -> bytes:
    body = {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}
    return json.dumps(body, sort_keys=True).encode()


# ---------------------------------------------------------------------------------------------
# Conditional writes, one backend per kind of store


class LocalObjects:
    """Conditional writes on a local folder."""

    def __init__(self, root: Path):
        self.root = root

    def create(self, key: str, data: bytes) -> bytes:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise Changed(key) from None
        finally:
            tmp.unlink(missing_ok=True)
        return data

    def read(self, key: str) -> tuple[bytes, bytes] | None:
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, key: str, data: bytes, tag: bytes) -> bytes:
        path = self.root / key
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, after the swap
        except FileNotFoundError:
            raise Changed(key) from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                same_file = os.fstat(handle.fileno()).st_ino == path.stat().st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file or handle.read() != tag:
                raise Changed(key)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return data


class S3Objects:
    """Conditional writes on S3 (or any server of its API that honours If-None-Match/If-Match)."""

    def __init__(self, location: Location):
        self.fs = location.filesystem()
        self.prefix = location.path.rstrip("/")

    def _split(self, key: str) -> tuple[str, str]:
        bucket, _, rest = f"{self.prefix}/{key}".partition("/")
        return bucket, rest

    def create(self, key: str, data: bytes) -> str:
        try:
            self.fs.pipe_file(f"{self.prefix}/{key}", data, mode="create")
        except OSError as err:  # s3fs: FileExistsError only when the server names the condition
            if isinstance(err, FileExistsError) or _precondition_failed(err):
                raise Changed(key) from None
            raise
        found = self.read(key)
        if found is None:
            raise Changed(key)
        return found[1]

    def read(self, key: str) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        bucket, path = self._split(key)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=path)
            body = response["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, response["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace(self, key: str, data: bytes, tag: str) -> str:
        bucket, path = self._split(key)
        try:
            response = self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data,
                                       IfMatch=tag)
        except OSError as err:
            if isinstance(err, FileNotFoundError) or _precondition_failed(err):
                raise Changed(key) from None
            raise
        self.fs.invalidate_cache(f"{self.prefix}/{key}")
        return response["ETag"]


def _precondition_failed(err: BaseException) -> bool:
    cause = err.__cause__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def objects_of(location: Location):
    """The conditional-write backend of a cache location, or a CacheError if it has none."""
    if location.is_local:
        return LocalObjects(location.local_path())
    if location.protocol in ("s3", "s3a"):
        return S3Objects(location)
    raise CacheError(
        f"a build into {location.url} needs conditional writes, which adaspec implements for "
        "local folders and s3:// (any S3-compatible server); read-only commands work on "
        f"{location.protocol}://"
    )


# ---------------------------------------------------------------------------------------------
# The lease


def _machine() -> dict:
    """What makes a pid meaningful: the host, its boot and the pid namespace (containers that
    share a hostname do not share pids)."""
    def read(path: str, link: bool = False) -> str | None:
        try:
            return os.readlink(path) if link else Path(path).read_text().strip()
        except OSError:
            return None

    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("/proc/self/ns/pid", link=True)}


def _alive_here(holder: dict) -> bool:
    """False only when the holder is a process of this machine's pid namespace (same host,
    boot and namespace) that no longer exists."""
    here = _machine()
    if any(holder.get(k) != here[k] for k in here) or here["pid_ns"] is None:
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _expires(record: dict) -> float:
    """When the lease runs out; a damaged record (no number) counts as run out: its holder, if
    any, finds the lease taken when it renews and stops writing."""
    try:
        return float(record.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0


def _free(record: dict, now: float) -> bool:
    return (bool(record.get("released", False)) or _expires(record) < now
            or not _alive_here(record))


class Lease:
    """One process's lease on a `<task>/<split>` build; `acquire`, then `release`."""

    def __init__(self, location: Location, task: str, split: str, rank: int):
        self.location = location
        self.objects = objects_of(location)
        self.key = f"{LEASES}/{task}.{split}.rank{rank}/zarr.json"
        self.what = f"{location.url}/{task}/{split}"
        self.seconds = lease_seconds()
        self.holder = {**_machine(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.tag = None
        self.lost: str | None = None
        self.renewed = 0.0  # when the store last accepted our lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        lease = {**self.holder, "renewed": now, "expires": now + self.seconds,
                 "released": released}
        return _group_json({"adaspec_lease": lease})

    def _ours(self) -> bool:
        """Whether the stored lease is ours (a conditional write whose answer was lost and that
        the client retried reads as a conflict with itself); adopts its tag if so."""
        found = self.objects.read(self.key)
        if found is None or _lease_record(found[0]).get("token") != self.holder["token"]:
            return False
        self.tag = found[1]
        return True

    def acquire(self) -> None:
        self._ensure_parent()
        started = time.time()
        try:
            self.tag = self.objects.create(self.key, self._record())
        except Changed:
            if not self._ours():
                self._take_over()
        self.renewed = started
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="adaspec-lease")
        self._thread.start()

    def _ensure_parent(self) -> None:
        with contextlib.suppress(Changed):
            self.objects.create(f"{LEASES}/zarr.json", _group_json(None))

    def _take_over(self) -> None:
        for _ in range(5):
            found = self.objects.read(self.key)
            if found is None:  # released and removed between our calls: create it again
                try:
                    self.tag = self.objects.create(self.key, self._record())
                    return
                except Changed:
                    continue
            data, tag = found
            record = _lease_record(data)
            if not _free(record, time.time()):
                left = max(0.0, _expires(record) - time.time())
                raise CacheError(
                    f"another build is writing {self.what} (lease held by "
                    f"{record.get('host')} pid {record.get('pid')}, expires in {left:.0f} s "
                    "unless renewed); wait for it to finish or use another --cache")
            try:
                self.tag = self.objects.replace(self.key, self._record(), tag)
                return
            except Changed:
                if self._ours():
                    return
                continue
        raise CacheError(f"could not take the build lease of {self.what}: other builders keep "
                         "changing it; run one build at a time")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            with self._guard:
                started = time.time()
                try:
                    self.tag = self.objects.replace(self.key, self._record(), self.tag)
                    self.renewed = started
                except Changed:
                    if self._ours():
                        self.renewed = started
                        continue
                    self.lost = "another builder took the lease over"
                    return
                except Exception:  # noqa: BLE001 - a network error: try at the next renewal
                    continue

    def check(self) -> None:
        """Refuse to write on once the lease is lost, or unrenewed past its expiry (another
        builder may hold it now): called before each shard is written and before finishing."""
        if self.lost is None and time.time() > self.renewed + self.seconds:
            self.lost = f"not renewed for {self.seconds:.0f} s (the store unreachable?)"
        if self.lost is not None:
            raise CacheError(f"the build of {self.what} lost its lease ({self.lost}); stopped "
                             "before writing more: run it again (written shards stay done)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._guard:
            if self.tag is None or self.lost:
                return
            with contextlib.suppress(Changed, OSError):
                self.objects.replace(self.key, self._record(released=True), self.tag)


def _lease_record(data: bytes) -> dict:
    try:
        record = json.loads(data)["attributes"]["adaspec_lease"]
    except (ValueError, KeyError, TypeError):
        return {"released": True}  # a damaged lease holds nothing
    return record if isinstance(record, dict) else {"released": True}


# ---------------------------------------------------------------------------------------------
# The build lock


@contextlib.contextmanager
def build_lock(root: str, task: str, split: str, rank: int = 0) -> Iterator[Lease]:
    """Refuse a second build into the same `<task>/<split>` while one runs, on a local folder
    or an object store: each process of a build holds a lease object in the store (`Lease`);
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
