"""The cache's writer for one `<task>/<split>` group: sequences whole, then each row stage shard
by shard (layout: `schema`).

`CacheWriter` is the only code that writes a manifest, and so the one that promises when a stage
is complete: sequences are written whole, then each row stage shard by shard through a
`StageWriter`, whose `finish()` marks the stage complete once every shard is.

Crash safety: rows are written in whole shards, and a shard is marked in the stage's `_done`
array only after all its arrays are written (Zarr's local store writes each file atomically).
A stage's status becomes "complete" only after every shard is marked, so a build that dies at any
moment leaves a store that resumes (`pending_shards`) and never one that claims to be complete.
Processes of a distributed build write disjoint shards and their own `_done` entries; one of them
(the caller decides which) opens stages and finishes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

from cache_tools import integrity, schema
from cache_tools.chunks import STORE_EVERY_CHUNK
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest, Stage, check_params
from cache_tools.manifest import write as write_manifest
from cache_tools.reader import CacheReader
from cache_tools.root import open_root

SHA256 = "_sha256"  # a row stage's (n_shards, n_arrays, 32) file digests, written per shard


def _write_sequence_arrays(
    group: zarr.Group,
    input_ids: Sequence[np.ndarray],
    label_masks: Sequence[np.ndarray],
    source_index: Sequence[int],
    vocab_size: int,
    texts: Sequence[str] | None = None,
) -> dict:
    """Write ragged sequences (overwriting any partial earlier attempt), and each one's text
    record when `texts` is given; returns their counts.

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
    if texts is not None:
        encoded = [text.encode("utf-8") for text in texts]
        arrays["texts"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        arrays["text_offsets"] = np.concatenate(
            [[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
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


def _sequence_digests(group: zarr.Group) -> dict[str, str]:
    """SHA-256 of every file of the sequences' arrays, as just written."""
    sequences = group[schema.SEQUENCES]
    return {key: digest for name in sorted(sequences.array_keys())
            for key, digest in integrity.digests(sequences[name]).items()}


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
                        package_version: str | None = None,
                        texts: Sequence[str] | None = None,
                        extra_counts: dict[str, int] | None = None) -> dict:
        """Write the ragged sequences (over any partial attempt) and mark them complete.

        `params` must hold `schema.TOKENIZER_FINGERPRINT`. `texts`, if given, is one record per
        sequence (`CacheReader.texts`); `extra_counts` joins the stage's counts (what the builder
        dropped or cut). Returns the counts: sequences, tokens, label_tokens and the extra ones.
        """
        if schema.TOKENIZER_FINGERPRINT not in params:
            raise ValueError(f"sequence params need {schema.TOKENIZER_FINGERPRINT!r}")
        group = self.group
        counts = _write_sequence_arrays(group, input_ids, label_masks, source_index, vocab_size,
                                        texts)
        counts.update(extra_counts or {})
        manifest = Manifest(task=self.task, split=self.split, vocab_size=int(vocab_size),
                            package_version=package_version,
                            stages={schema.SEQUENCES: Stage(schema.STATUS_COMPLETE, params,
                                                            counts, _sequence_digests(group))})
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
                         source_index: Sequence[int], vocab_size: int,
                         texts: Sequence[str] | None = None) -> dict:
        """Rewrite damaged sequence arrays from the same data; the manifest and every row stage
        stay (they index the same sequences). Refused when the data now makes other counts."""
        stored = self.manifest.stages[schema.SEQUENCES].counts
        counts = {"sequences": len(input_ids), "tokens": int(sum(len(x) for x in input_ids)),
                  "label_tokens": int(sum(int(np.count_nonzero(m)) for m in label_masks))}
        if {k: int(stored.get(k, -1)) for k in counts} != counts:
            raise CacheError(
                f"cache {self.task}/{self.split}: the data now makes other sequences ({counts}) "
                f"than the stored ones ({stored}); they cannot be repaired: use a new --cache")
        counts = _write_sequence_arrays(self.group, input_ids, label_masks, source_index,
                                        vocab_size, texts)
        group = self.group
        manifest = Manifest.read(group)
        manifest.stages[schema.SEQUENCES].files = _sequence_digests(group)
        write_manifest(group, manifest)
        return counts

    def open_stage(self, stage: str, params: dict, vocab_size: int,
                   shard_rows: int = schema.DEFAULT_SHARD_ROWS,
                   chunk_rows: int = schema.DEFAULT_CHUNK_ROWS, create: bool = True,
                   rebuild: bool = False, fix: str = "use a new --cache directory") -> StageWriter:
        """A writer of a row stage over the sequences' label rows, new or resumed; its arrays
        and their encoding follow from the stage and its `params` (`schema.stage_arrays`), ids
        sized for `vocab_size`.

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
        return StageWriter(self, stage, n_rows, params, vocab_size, shard_rows, chunk_rows,
                           create)

    def record_ref(self, name: str, record: dict) -> None:
        """Record a trained reference model under `refs[name]` (its path, weight hash, ...)."""
        group = self.group
        manifest = Manifest.read(group)
        manifest.refs[name] = record
        write_manifest(group, manifest)


class StageWriter:
    """Shard-by-shard writer of a row stage's arrays, resumable through its `_done` markers.
    It takes rows as computed (float32 log-probs, int64 ids, ...) and encodes them with the
    stage's format, like `datasets`' ArrowWriter with its schema.

    Made by `CacheWriter.open_stage`.
    """

    def __init__(
        self,
        writer: CacheWriter,
        stage: str,
        n_rows: int,
        params: dict,
        vocab_size: int,
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
        self.params = params
        self.vocab_size = int(vocab_size)
        self.n_rows = int(n_rows)
        self.shard_rows = int(shard_rows)
        self.n_shards = max(1, -(-self.n_rows // self.shard_rows))
        stage_group = group.require_group(stage)
        self.arrays: dict[str, zarr.Array] = {}
        for name, spec in schema.stage_arrays(stage, params, vocab_size).items():
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
        if create and SHA256 not in stage_group:  # each shard's file digests, by process
            width = (len(self.arrays), 32)
            stage_group.create_array(SHA256, shape=(self.n_shards, *width), dtype=np.uint8,
                                     chunks=(1, *width), fill_value=0)
        self.done = stage_group[schema.DONE].with_config(STORE_EVERY_CHUNK)
        self.sha256 = stage_group[SHA256].with_config(STORE_EVERY_CHUNK)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards not yet marked done that belong to process `rank` (round-robin)."""
        done = self.done[:]
        return [s for s in range(self.n_shards) if not done[s] and s % world_size == rank]

    def encode(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Computed rows -> this stage's stored arrays (what `write_shard` writes)."""
        return schema.encode_stage_rows(self.stage, self.params, rows, self.vocab_size)

    def write_shard(self, shard: int, rows: dict[str, np.ndarray]) -> None:
        """Encode and write one shard's computed rows, then mark it done (the order is the
        guarantee)."""
        self.write_stored_shard(shard, self.encode(rows))

    def write_stored_shard(self, shard: int, values: dict[str, np.ndarray]) -> None:
        """Write one shard of arrays already in this stage's stored encoding (a copy of another
        store's shard), then mark it done."""
        start, stop = self.shard_range(shard)
        if set(values) != set(self.arrays):
            raise ValueError(f"shard values {sorted(values)} != arrays {sorted(self.arrays)}")
        for name, array in self.arrays.items():
            if len(values[name]) != stop - start:
                raise ValueError(f"{name}: {len(values[name])} rows for shard of {stop - start}")
            if stop > start:
                array[start:stop] = values[name]
        self.sha256[shard] = self._shard_digests(shard)  # what a reader will compare
        self.done[shard] = 1

    def _shard_digests(self, shard: int) -> np.ndarray:
        """(n_arrays, 32) uint8: the SHA-256 of each array's file of `shard`, as stored."""
        start, stop = self.shard_range(shard)
        out = np.zeros((len(self.arrays), 32), dtype=np.uint8)
        for j, array in enumerate(self.arrays.values()):
            for _, key, _, _ in integrity.file_keys(array, start, stop):
                data = integrity.read_file(array, key)
                if data is not None:
                    out[j] = np.frombuffer(bytes.fromhex(integrity.sha256(data)), np.uint8)
        return out

    def _digests(self) -> dict[str, str]:
        """Every file's SHA-256 by key under the split, from the shards' records (a shard
        written before they were kept is hashed now)."""
        recorded = self.sha256[:]
        files = {}
        for shard in range(self.n_shards):
            if not recorded[shard].any():
                recorded[shard] = self._shard_digests(shard)
            start, stop = self.shard_range(shard)
            for j, array in enumerate(self.arrays.values()):
                for key, _, _, _ in integrity.file_keys(array, start, stop):
                    files[key] = bytes(recorded[shard, j]).hex()
        return files

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
        manifest.stages[self.stage] = Stage(schema.STATUS_COMPLETE, entry.params, counts,
                                            self._digests())
        write_manifest(group, manifest)
        return counts
