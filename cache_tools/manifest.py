"""The manifest of one `<task>/<split>` group: what it holds and how complete each stage is.

It lives as JSON in the group's attributes under "manifest", so any Zarr reader sees it:

    {"format": ..., "format_version": ..., "package_version": ...,
     "task": ..., "split": ..., "vocab_size": V,
     "stages": {"sequences" | "target" | "ref/<name>":
                    {"status": "building" | "complete", "params": {...}, "counts": {...},
                     "files": {"<stage>/<array>/c/<i>...": "<sha256 hex>"}}},
     "refs": {"<name>": {"path": ..., "weight_hash": ..., ...}}}

A stage's `params` are whatever its builder says made it; they are compared as a whole when a
build resumes (`check_params`), and stored with the data so that a reader can tell what it reads.
cache_tools interprets only the few fields it needs to decode rows (see `schema.TARGET_PARAMS`)
and the sequences' tokenizer fingerprint. A complete stage's `files` are the SHA-256 of each of its
chunk or shard files as written (`integrity.py`: readers check them). `refs` records trained
reference models by name (where they are and their weight hash) for the tools that score them.

Beside it, under "manifest_sha256", the SHA-256 of its canonical JSON: the chunks carry
checksums, and this is the manifest's, so a manifest damaged where it still parses (a garbled
weight hash, a count) is refused on reading rather than believed.

Only `store.CacheWriter` writes a manifest; everyone else reads it through this class.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cache_tools import schema
from cache_tools.errors import CacheError

KEY = "manifest"  # the group attribute holding the manifest
DIGEST_KEY = "manifest_sha256"  # the group attribute holding its digest


@dataclass
class Stage:
    """One stage's entry: its status, the parameters it was built with, its counts, and the
    SHA-256 of its files once complete."""

    status: str
    params: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == schema.STATUS_COMPLETE


@dataclass
class Manifest:
    """A typed view of the manifest; unknown top-level keys are kept as they are."""

    task: str = ""
    split: str = ""
    vocab_size: int = 0
    stages: dict[str, Stage] = field(default_factory=dict)
    refs: dict[str, dict] = field(default_factory=dict)
    format: str = schema.FORMAT_NAME
    format_version: int = schema.FORMAT_VERSION
    package_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        data = copy.deepcopy(dict(data))
        stages = {
            name: Stage(entry.get("status", schema.STATUS_BUILDING), entry.get("params", {}),
                        entry.get("counts") or {}, entry.get("files") or {})
            for name, entry in data.pop("stages", {}).items()
        }
        known = {"task", "split", "vocab_size", "refs", "format", "format_version",
                 "package_version"}
        values = {key: data.pop(key) for key in known if key in data}
        return cls(stages=stages, extra=data, **values)

    def to_json(self) -> dict:
        out = {
            "format": self.format, "format_version": self.format_version,
            "package_version": self.package_version, "task": self.task, "split": self.split,
            "vocab_size": self.vocab_size,
            "stages": {name: {"status": s.status, "params": s.params,
                              **({"counts": s.counts} if s.counts else {}),
                              **({"files": s.files} if s.files else {})}
                       for name, s in self.stages.items()},
            **({"refs": self.refs} if self.refs else {}),
            **self.extra,
        }
        return copy.deepcopy(out)

    @classmethod
    def read(cls, group) -> Manifest:
        """The group's manifest (an empty one for a group that has none yet); a CacheError when
        it does not match its digest."""
        data, stored = group.attrs.get(KEY), group.attrs.get(DIGEST_KEY)
        if data is None and stored is None:
            return cls()
        if stored is None:
            raise CacheError(
                f"split group {group.path}: its manifest has no digest ({DIGEST_KEY}): written "
                "by an adaspec older than the digest, or damaged; rebuild the split")
        if data is None or stored != digest(data):
            raise CacheError(
                f"split group {group.path}: its manifest does not match its digest "
                f"({DIGEST_KEY}): the store is damaged (or was edited by hand); rebuild the split")
        return cls.from_json(data)

    def stage(self, name: str) -> Stage | None:
        return self.stages.get(name)

    def is_complete(self, name: str) -> bool:
        stage = self.stages.get(name)
        return stage is not None and stage.complete

    @property
    def sequence_params(self) -> dict:
        """The parameters the sequences were made with ({} before they exist)."""
        stage = self.stages.get(schema.SEQUENCES)
        return stage.params if stage else {}

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.sequence_params.get(schema.TOKENIZER_FINGERPRINT)

    @property
    def target_params(self) -> dict:
        stage = self.stages.get(schema.TARGET)
        return stage.params if stage else {}

    def ref_names(self, complete_only: bool = True) -> list[str]:
        """Names of the stored reference stages (`ref/<name>`), complete ones by default."""
        prefix = schema.REF_PREFIX + "/"
        return sorted(name.removeprefix(prefix) for name, stage in self.stages.items()
                      if name.startswith(prefix) and (stage.complete or not complete_only))


def digest(data: dict) -> str:
    """SHA-256 of a manifest's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def write(group, manifest: Manifest) -> None:
    """Store the manifest and its digest (for `store.CacheWriter` only: it decides what a
    stage's status is)."""
    data = manifest.to_json()
    group.attrs.update({KEY: data, DIGEST_KEY: digest(data)})


def check_params(where: str, stored: dict, asked: dict, fix: str) -> None:
    """Refuse, in one line naming the first difference, settings that differ from the store's."""
    for key in sorted(set(stored) | set(asked)):
        if stored.get(key) != asked.get(key):
            raise CacheError(
                f"{where} was built with {key}={stored.get(key)!r} but this run has "
                f"{key}={asked.get(key)!r}; {fix}"
            )
