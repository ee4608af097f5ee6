"""The logit cache's writer/reader pair for one `<task>/<split>` group (layout: `schema`).

`CacheWriter` is the only code that writes a manifest, and so the one that promises when a stage
is complete: sequences are written whole, then each row stage shard by shard through a
`StageWriter`, whose `finish()` marks the stage complete once every shard is.
`CacheReader` reads a complete group back as decoded numpy.

Crash safety: rows are written in whole shards, and a shard is marked in the stage's `_done`
array only after all its arrays are written (Zarr's local store writes each file atomically).
A stage's status becomes "complete" only after every shard is marked, so a build that dies at any
moment leaves a store that resumes (`pending_shards`) and never one that claims to be complete.
Processes of a distributed build write disjoint shards and their own `_done` entries; one of them
(the caller decides which) opens stages and finishes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import zarr

from cache_tools import schema
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest, Stage
from cache_tools.manifest import write as write_manifest
from cache_tools.schema import RowArray

# Lock and staging files sit beside the groups on purpose; Zarr warns about any such file.
warnings.filterwarnings(
    "ignore", message=".*is not recognized as a component of a Zarr hierarchy", category=UserWarning
)


# Zarr skips writing a chunk that equals the fill value, and reads an absent chunk as the fill
# value: a deleted chunk file would then read as zeros. Every chunk is written, so an absent one
# is damage (`check_stored`).
STORE_EVERY_CHUNK = {"write_empty_chunks": True}


def is_local(root: str) -> bool:
    return "://" not in str(root) or str(root).startswith("file://")


def _local_path(root: str) -> Path:
    return Path(str(root).removeprefix("file://"))


OWN_HIDDEN = (".build-", ".generate-")  # lock files and generation staging beside the groups


def check_local_root(root: str) -> None:
    """Refuse, before anything is written, a local folder that is not a cache: a file, a Zarr v2
    store, or a non-empty folder without the root's zarr.json."""
    path = _local_path(root)
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


def open_root(root: str, mode: str = "a") -> zarr.Group:
    """Open (or with mode "a", create) a cache root group; refuse folders that are not caches."""
    if mode == "r" and is_local(root) and not _local_path(root).exists():
        raise CacheError(f"no cache at {root}; build one with `adaspec-cache build`")
    if is_local(root):
        check_local_root(root)
    if is_local(root):  # zarr's size queries resolve a relative store path against nothing
        root = str(_local_path(root).resolve())
    try:
        group = zarr.open_group(root, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise CacheError(f"no cache at {root}; build one with `adaspec-cache build`") from err
    except (ValueError, zarr.errors.ContainsArrayError) as err:
        reason = (str(err).splitlines() or [""])[0][:100]
        raise CacheError(f"{root} is not a Zarr v3 logit cache, or its zarr.json is damaged "
                         f"({type(err).__name__}: {reason})") from None
    attrs = dict(group.attrs)
    if not attrs and mode != "r":
        if len(list(group.keys())) > 0:
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


# ---------------------------------------------------------------------------------------------
# Writing


def check_params(where: str, stored: dict, asked: dict, fix: str) -> None:
    """Refuse, in one line naming the first difference, settings that differ from the store's."""
    for key in sorted(set(stored) | set(asked)):
        if stored.get(key) != asked.get(key):
            raise CacheError(
                f"{where} was built with {key}={stored.get(key)!r} but this run has "
                f"{key}={asked.get(key)!r}; {fix}"
            )


def _write_sequence_arrays(
    group: zarr.Group,
    input_ids: Sequence[np.ndarray],
    label_masks: Sequence[np.ndarray],
    source_index: Sequence[int],
    vocab_size: int,
) -> dict:
    """Write ragged sequences (overwriting any partial earlier attempt); returns their counts.

    Every id must be one the tokenizer can produce (0 <= id < vocab_size): an id past it (e.g.
    drawn from a padded embedding row) would wrap in the id dtype or index nothing downstream, and
    `verify` would reject the whole store later, far from the cause.
    """
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    n_labels = np.array([int(np.count_nonzero(m)) for m in label_masks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    label_offsets = np.concatenate([[0], np.cumsum(n_labels)]).astype(np.int64)
    raw_ids = np.concatenate(input_ids) if len(input_ids) else np.zeros(0, np.int64)
    bad = np.flatnonzero((raw_ids < 0) | (raw_ids >= vocab_size))
    if bad.size:
        i = int(np.searchsorted(offsets, bad[0], side="right")) - 1
        raise CacheError(
            f"sequence {i} (source index {int(source_index[i])}) holds token id "
            f"{int(raw_ids[bad[0]])} at position {int(bad[0] - offsets[i])}, outside the "
            f"tokenizer's {vocab_size} ids; the ids must come from the tokenizer the cache records"
        )
    ids_dtype = schema.id_dtype(vocab_size)
    flat_ids = raw_ids.astype(ids_dtype)
    flat_mask = np.concatenate(label_masks).astype(bool) if len(input_ids) else np.zeros(0, bool)
    seq_group = group.require_group(schema.SEQUENCES)
    arrays = {
        "input_ids": flat_ids,
        "label_mask": flat_mask,
        "offsets": offsets,
        "label_offsets": label_offsets,
        "source_index": np.asarray(source_index, dtype=np.int64),
    }
    for name, values in arrays.items():
        array = seq_group.create_array(
            name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=(schema.SEQUENCE_CHUNK,),
            compressors=schema.compressors(values.dtype),
            fill_value=0,
            overwrite=True,
            config=STORE_EVERY_CHUNK,
        )
        if values.size:
            array[:] = values
    return {
        "sequences": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "label_tokens": int(n_labels.sum()),
    }


class CacheWriter:
    """Writes one `<task>/<split>` group: its sequences, then row stages shard by shard.

    Shaped like datasets' ArrowWriter: the writer owns the manifest, `write_sequences` and
    `StageWriter.finish` return counts, and a stage is complete only when `finish` says so.
    Under several processes, one process (the caller's main) calls `write_sequences`,
    `open_stage(create=True)`, `finish` and `record_ref`; the others `open_stage(create=False)`
    after it and write their own shards.
    """

    def __init__(self, root: str, task: str, split: str):
        # Nothing is touched yet: under several processes only one may create the groups
        # (two creating one group's metadata at once can drop the other's manifest).
        self.root = str(root)
        self.task, self.split = task, split

    @property
    def group(self) -> zarr.Group:
        """The split's group (created on first use), opened afresh: a Group caches its metadata
        when opened, and another process (or writer) may have changed the manifest since."""
        return open_root(self.root, mode="a").require_group(self.task).require_group(self.split)

    @property
    def manifest(self) -> Manifest:
        """The manifest as stored now (other processes may have changed it)."""
        return Manifest.read(self.group)

    def check_sequences(self, params: dict, fix: str) -> bool:
        """True when the sequences are complete and made with `params`; a CacheError naming
        the first difference (and `fix`) when they are complete with other params."""
        stage = self.manifest.stage(schema.SEQUENCES)
        if stage is None or not stage.complete:
            return False
        check_params(f"cache {self.task}/{self.split} sequences", stage.params, params, fix)
        return True

    def write_sequences(self, input_ids: Sequence[np.ndarray], label_masks: Sequence[np.ndarray],
                        source_index: Sequence[int], vocab_size: int, params: dict,
                        package_version: str | None = None) -> dict:
        """Write the ragged sequences (over any partial attempt) and mark them complete.

        `params` must hold `schema.TOKENIZER_FINGERPRINT`. Returns the counts: sequences,
        tokens, label_tokens.
        """
        if schema.TOKENIZER_FINGERPRINT not in params:
            raise ValueError(f"sequence params need {schema.TOKENIZER_FINGERPRINT!r}")
        group = self.group
        counts = _write_sequence_arrays(group, input_ids, label_masks, source_index, vocab_size)
        manifest = Manifest(task=self.task, split=self.split, vocab_size=int(vocab_size),
                            package_version=package_version,
                            stages={schema.SEQUENCES: Stage(schema.STATUS_COMPLETE, params,
                                                            counts)})
        write_manifest(group, manifest)
        return counts

    def sequences_readable(self) -> bool:
        """Whether the complete sequences read back whole (every chunk present and intact)."""
        try:
            CacheReader(self.root, self.task, self.split, require=()).sequence_lists()
        except CacheError:
            return False
        return True

    def repair_sequences(self, input_ids: Sequence[np.ndarray], label_masks: Sequence[np.ndarray],
                         source_index: Sequence[int], vocab_size: int) -> dict:
        """Rewrite damaged sequence arrays from the same data; the manifest and every row stage
        stay (they index the same sequences). Refused when the data now makes other counts."""
        stored = self.manifest.stages[schema.SEQUENCES].counts
        counts = {"sequences": len(input_ids), "tokens": int(sum(len(x) for x in input_ids)),
                  "label_tokens": int(sum(int(np.count_nonzero(m)) for m in label_masks))}
        if {k: int(stored.get(k, -1)) for k in counts} != counts:
            raise CacheError(
                f"cache {self.task}/{self.split}: the data now makes other sequences ({counts}) "
                f"than the stored ones ({stored}); they cannot be repaired: use a new --cache")
        return _write_sequence_arrays(self.group, input_ids, label_masks, source_index,
                                      vocab_size)

    def open_stage(self, stage: str, params: dict, arrays: dict[str, RowArray],
                   shard_rows: int = schema.DEFAULT_SHARD_ROWS,
                   chunk_rows: int = schema.DEFAULT_CHUNK_ROWS, create: bool = True,
                   rebuild: bool = False, fix: str = "use a new --cache directory") -> StageWriter:
        """A writer of a row stage over the sequences' label rows, new or resumed.

        create=True (one process): a stored stage must have the same `params` (else a
        CacheError naming the difference and `fix`), or with `rebuild` it is discarded first.
        The manifest says "building" before anything is deleted and the `_done` markers go
        first, so a rebuild that dies midway writes every shard again when resumed.
        create=False: reopen the stage another process created.
        """
        group = self.group
        manifest = Manifest.read(group)
        if not manifest.is_complete(schema.SEQUENCES):
            raise CacheError(f"cache {self.task}/{self.split} has no complete sequences")
        n_rows = int(manifest.stages[schema.SEQUENCES].counts["label_tokens"])
        if create:
            entry = manifest.stage(stage)
            if entry is not None and rebuild:
                manifest.stages[stage] = Stage(schema.STATUS_BUILDING, params)
                write_manifest(group, manifest)
                if stage in group:
                    if schema.DONE in group[stage]:
                        del group[stage][schema.DONE]
                    del group[stage]
            elif entry is not None:
                check_params(f"cache stage '{stage}'", entry.params, params, fix)
            if stage not in manifest.stages:
                manifest.stages[stage] = Stage(schema.STATUS_BUILDING, params)
                write_manifest(group, manifest)
        return StageWriter(self, stage, n_rows, arrays, shard_rows, chunk_rows, create)

    def record_ref(self, name: str, record: dict) -> None:
        """Record a trained reference model under `refs[name]` (its path, weight hash, ...)."""
        group = self.group
        manifest = Manifest.read(group)
        manifest.refs[name] = record
        write_manifest(group, manifest)


class StageWriter:
    """Shard-by-shard writer of a row stage's arrays, resumable through its `_done` markers.

    Made by `CacheWriter.open_stage`.
    """

    def __init__(
        self,
        writer: CacheWriter,
        stage: str,
        n_rows: int,
        arrays: dict[str, RowArray],
        shard_rows: int,
        chunk_rows: int,
        create: bool,
    ):
        group = writer.group
        self.writer = writer
        if shard_rows % chunk_rows:
            raise ValueError(
                f"shard_rows={shard_rows} must be a multiple of chunk_rows={chunk_rows}"
            )
        self.stage = stage
        self.n_rows = int(n_rows)
        self.shard_rows = int(shard_rows)
        self.n_shards = max(1, -(-self.n_rows // self.shard_rows))
        stage_group = group.require_group(stage)
        self.arrays: dict[str, zarr.Array] = {}
        for name, spec in arrays.items():
            shape = (self.n_rows,) if spec.width is None else (self.n_rows, spec.width)
            if create and name not in stage_group:
                self.arrays[name] = stage_group.create_array(
                    name,
                    shape=shape,
                    dtype=spec.dtype,
                    shards=(self.shard_rows,) + shape[1:],
                    chunks=(chunk_rows,) + shape[1:],
                    compressors=schema.compressors(spec.dtype),
                    fill_value=spec.fill_value,
                    config=STORE_EVERY_CHUNK,
                )
            else:  # the write config is not stored with an array: set it on every handle
                self.arrays[name] = stage_group[name].with_config(STORE_EVERY_CHUNK)
            if self.arrays[name].shape != shape:
                raise CacheError(
                    f"{stage}/{name} has shape {self.arrays[name].shape}, expected {shape}; "
                    "the store was written by another build: use a new --cache directory"
                )
        if create and schema.DONE not in stage_group:
            stage_group.create_array(
                schema.DONE, shape=(self.n_shards,), dtype=np.uint8, chunks=(1,), fill_value=0
            )
        self.done = stage_group[schema.DONE].with_config(STORE_EVERY_CHUNK)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards not yet marked done that belong to process `rank` (round-robin)."""
        done = self.done[:]
        return [s for s in range(self.n_shards) if not done[s] and s % world_size == rank]

    def write_shard(self, shard: int, values: dict[str, np.ndarray]) -> None:
        """Write every array's rows of one shard, then mark it done (the order is the guarantee)."""
        start, stop = self.shard_range(shard)
        if set(values) != set(self.arrays):
            raise ValueError(f"shard values {sorted(values)} != arrays {sorted(self.arrays)}")
        for name, array in self.arrays.items():
            if len(values[name]) != stop - start:
                raise ValueError(f"{name}: {len(values[name])} rows for shard of {stop - start}")
            if stop > start:
                array[start:stop] = values[name]
        self.done[shard] = 1

    def all_done(self) -> bool:
        return bool(np.all(self.done[:] == 1))

    def finish(self, counts: dict | None = None) -> dict | None:
        """Mark the stage complete if every shard is written; returns its counts, or None
        while shards are missing (another process's, or an interrupted build's)."""
        if not self.all_done():
            return None
        counts = {"label_tokens": self.n_rows, "shards": self.n_shards, **(counts or {})}
        group = self.writer.group
        manifest = Manifest.read(group)
        entry = manifest.stages[self.stage]
        manifest.stages[self.stage] = Stage(schema.STATUS_COMPLETE, entry.params, counts)
        write_manifest(group, manifest)
        return counts


# ---------------------------------------------------------------------------------------------
# Locking


@contextlib.contextmanager
def build_lock(root: str, task: str, split: str, rank: int = 0) -> Iterator[None]:
    """Refuse a second build into the same `<task>/<split>` while one runs (local stores only).

    Each process of a build holds its own lock file; the kernel drops it when the process dies,
    so a killed build never leaves a stale lock behind.
    """
    if not is_local(root):
        yield
        return
    # Beside the groups, not inside them: a folder without zarr.json confuses Zarr readers.
    lock_dir = _local_path(root)
    check_local_root(root)  # before the lock file: a foreign folder is left as it was
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache {root} ({err.strerror})") from None
    lock_path = lock_dir / f".build-{task}-{split}-rank{rank}.lock"
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held for the duration of the context
    except OSError as err:
        raise CacheError(f"cannot write the cache {root} ({err.strerror}); a build needs a "
                         "writable --cache") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise CacheError(
                f"another build is writing {root}/{task}/{split} (lock {lock_path.name}); "
                "wait for it to finish or use another --cache"
            ) from err
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


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
        base = _local_path(root) / array.path / "c"
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


class CacheReader:
    """Read-only access to one complete `<task>/<split>` group, decoded to plain numpy.

    It answers what a user of the cache asks: the vocabulary size, the tokenizer fingerprint,
    the stages' parameters, the recorded references, and rows. A chunk that cannot be read
    (corrupt, truncated) raises a one-line CacheError naming it.
    """

    def __init__(self, root: str, task: str, split: str, require: Sequence[str] = (schema.TARGET,)):
        root_group = open_root(root, mode="r")
        path = split_path(task, split)
        try:
            present = path in root_group
        except METADATA_ERRORS as err:
            raise metadata_error(str(root), path, err) from None
        if not present and is_local(root) and (_local_path(root) / path).is_dir():
            raise metadata_error(str(root), path, FileNotFoundError("zarr.json"))
        if not present:
            have = ", ".join(list_splits(root_group)) or "nothing"
            raise CacheError(
                f"cache {root} has no {path} (it holds: {have}); build it with "
                f"`adaspec-cache build --task {task} --split {split}`"
            )
        self.root = str(root)
        self.task, self.split = task, split
        self.group = member(root_group, path, self.root)
        try:
            self.manifest = Manifest.read(self.group)
        except METADATA_ERRORS as err:
            raise metadata_error(self.root, path, err) from None
        if (self.manifest.task, self.manifest.split) != (task, split):
            raise CacheError(
                f"cache {root}/{path} holds {self.manifest.task}/{self.manifest.split} (its "
                "manifest says so): a split copied or renamed by hand; build the split itself")
        for stage in (schema.SEQUENCES, *require):
            if not self.manifest.is_complete(stage):
                raise CacheError(
                    f"cache {root}/{path} has no complete '{stage}' stage; run (or resume) "
                    f"`adaspec-cache build` for it"
                )
        sequences = member(self.group, schema.SEQUENCES, self.root)
        self._seq = {name: member(sequences, name, self.root) for name in schema.SEQUENCE_ARRAYS}
        for array in self._seq.values():
            check_stored(array, self.root)
        self.offsets = self._whole("offsets")  # (S+1,) int64
        self.label_offsets = self._whole("label_offsets")  # (S+1,) int64
        self.source_index = self._whole("source_index")  # (S,) int64
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None  # read on first use
        # Arrays are opened once: opening one reads its metadata from the store.
        self._arrays: dict[str, dict[str, zarr.Array]] = {}

    def _whole(self, name: str) -> np.ndarray:
        return read_rows(self._seq[name], 0, self._seq[name].shape[0], self.root)

    # What the cache holds ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Token ids the sequences' tokenizer can produce (the rows' vocabulary)."""
        return int(self.manifest.vocab_size)

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.manifest.tokenizer_fingerprint

    @property
    def sequence_params(self) -> dict:
        return self.manifest.sequence_params

    @property
    def target_params(self) -> dict:
        return self.manifest.target_params

    @property
    def recorded_refs(self) -> dict[str, dict]:
        """Trained reference models recorded by name (`CacheWriter.record_ref`)."""
        return self.manifest.refs

    def ref_names(self) -> list[str]:
        """Names of the complete reference-loss stages."""
        return self.manifest.ref_names()

    def ref_stage(self, name: str) -> Stage:
        """The complete `ref/<name>` stage (a CacheError saying how to make it otherwise)."""
        stage = self.manifest.stage(schema.ref_group_name(name))
        if stage is None or not stage.complete:
            have = ", ".join(self.ref_names()) or "none"
            raise CacheError(
                f"cache has no complete reference '{name}' (complete: {have}); train one with "
                f"`adaspec-train --stage ref` and build it with `adaspec-cache build --model ref`"
            )
        return stage

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_label_rows(self) -> int:
        return int(self.label_offsets[-1])

    # Rows ---------------------------------------------------------------------------------------

    def all_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sequence's tokens (int64) and label mask (bool), concatenated; read once and
        held (2-4 B per token stored, no logits). A bounded-memory reader uses `token_rows`."""
        if self._tokens is None:
            self._tokens = (self._whole("input_ids").astype(np.int64),
                            self._whole("label_mask").astype(bool))
        return self._tokens

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (T,) int64, label_mask (T,) bool) of one sequence."""
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        ids, mask = self.all_tokens()
        return ids[start:stop], mask[start:stop]

    def sequence_lists(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every sequence's input_ids (int64) and label mask (bool), one array per sequence."""
        ids, mask = self.all_tokens()
        spans = list(zip(self.offsets[:-1], self.offsets[1:], strict=True))
        return [ids[a:b] for a, b in spans], [mask[a:b] for a, b in spans]

    def token_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of the concatenated sequences, as stored (uint16/uint32) with
        their label mask, read from the store (nothing held)."""
        if self._tokens is not None:
            return self._tokens[0][start:stop], self._tokens[1][start:stop]
        return (read_rows(self._seq["input_ids"], start, stop, self.root),
                read_rows(self._seq["label_mask"], start, stop, self.root).astype(bool))

    def _stage_arrays(self, stage: str) -> dict[str, zarr.Array]:
        if stage not in self._arrays:
            group = member(self.group, stage, self.root)
            self._arrays[stage] = {name: member(group, name, self.root)
                                   for name in self.stage_array_names(stage)}
            for array in self._arrays[stage].values():
                check_stored(array, self.root)
        return self._arrays[stage]

    def stored_rows(self, stage: str, start: int, stop: int,
                    names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a row stage's arrays as stored (not decoded)."""
        arrays = self._stage_arrays(stage)
        return {name: read_rows(arrays[name], start, stop, self.root)
                for name in (names if names is not None else arrays)}

    def stage_array_names(self, stage: str) -> list[str]:
        """The arrays a complete stage holds, by the format (not by what the folder lists: an
        array whose metadata was deleted would silently vanish from a listing)."""
        if stage == schema.SEQUENCES:
            return list(schema.SEQUENCE_ARRAYS)
        if stage == schema.TARGET:
            p = self.target_params
            return list(schema.target_arrays(p.get(schema.MODE), int(p.get(schema.K, 1)),
                                             p.get(schema.VALUE_ENCODING, "float16"),
                                             self.vocab_size))
        return list(schema.ref_arrays())

    @property
    def target_row_bytes(self) -> int:
        """Bytes one label row of the target stage takes as stored, once read (ids widened to
        their stored dtype, values in their encoding, the tail or the draw counts)."""
        params = self.target_params
        k = int(params.get(schema.K, 1))
        ids = schema.id_dtype(self.vocab_size).itemsize
        value = schema.value_dtype(params.get(schema.VALUE_ENCODING, "float16")).itemsize
        extra = 2 * k if params.get(schema.MODE) == "sample" else 4
        return k * (ids + value) + extra

    def decode_target(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Target rows as `stored_rows` returns them -> decoded (as `target_rows`)."""
        return schema.decode_target_rows(stored, self.target_params)

    def target_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Decoded target rows [start, stop): ids (n, K) int64, logprobs (n, K) float32, and
        tail_logmass (n,) float32 (topk) or counts (n, K) float32 (sample)."""
        return self.decode_target(self.stored_rows(schema.TARGET, start, stop))

    def ref_losses(self, name: str, divergence: str, start: int, stop: int) -> np.ndarray:
        """(n,) float32 per-token losses of reference `name` for label rows [start, stop)."""
        stage = schema.ref_group_name(name)
        self.ref_stage(name)
        rows = self.stored_rows(stage, start, stop, [f"loss_{divergence}"])
        return rows[f"loss_{divergence}"].astype(np.float32)
