"""The cache's reader for one complete `<task>/<split>` group, decoded to plain numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

from cache_tools import schema
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest, Stage
from cache_tools.zarr_io import (
    METADATA_ERRORS,
    check_stored,
    is_local,
    list_splits,
    local_path,
    member,
    metadata_error,
    open_root,
    read_rows,
    split_path,
)


class CacheReader:
    """Read-only access to one complete `<task>/<split>` group, decoded to plain numpy.

    It answers what a user of the cache asks: the vocabulary size, the tokenizer fingerprint,
    the stages' parameters, the recorded references, and rows. A chunk that cannot be read
    (corrupt, truncated) raises a one-line CacheError naming it.
    """

    def __init__(self, root: str, task: str, split: str, require: Sequence[str] = (schema.TARGET,),
                 local_cache: tuple[str, int] | None = None):
        root_group = open_root(root, mode="r", local_cache=local_cache)
        path = split_path(task, split)
        try:
            present = path in root_group
        except METADATA_ERRORS as err:
            raise metadata_error(str(root), path, err) from None
        if not present and is_local(root) and (local_path(root) / path).is_dir():
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

    def texts(self) -> list[str] | None:
        """Each sequence's text record (in sequence order) when the builder stored them (task
        chat: its conversation row as JSON), else None."""
        sequences = member(self.group, schema.SEQUENCES, self.root)
        if schema.TEXT_ARRAYS[0] not in sequences:
            return None
        arrays = [member(sequences, name, self.root) for name in schema.TEXT_ARRAYS]
        for array in arrays:
            check_stored(array, self.root)
        data, offsets = (read_rows(a, 0, a.shape[0], self.root) for a in arrays)
        raw = data.tobytes()
        return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

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
                                   for name in schema.stage_array_names(
                                       stage, self.manifest.stages[stage].params,
                                       self.vocab_size)}
            for array in self._arrays[stage].values():
                check_stored(array, self.root)
        return self._arrays[stage]

    def stored_rows(self, stage: str, start: int, stop: int,
                    names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a row stage's arrays as stored (not decoded)."""
        arrays = self._stage_arrays(stage)
        return {name: read_rows(arrays[name], start, stop, self.root)
                for name in (names if names is not None else arrays)}

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
