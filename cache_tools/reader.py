"""The cache's reader for one complete `<task>/<split>` group, decoded to plain numpy.

It trusts nothing it reads (`integrity.py`): each array's metadata is the format's, each file is
the one written there (its SHA-256, checked once per file and process), and decoded values pass
`verify`'s checks, so a cache that verify refuses is refused here too, in one line.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import zarr

from cache_tools import integrity, schema
from cache_tools.chunks import check_stored, read_rows
from cache_tools.errors import CacheError
from cache_tools.location import is_local, local_path
from cache_tools.manifest import Manifest, Stage
from cache_tools.metadata import METADATA_ERRORS, member, metadata_error
from cache_tools.root import open_root
from cache_tools.splits import list_splits, split_path

_checked_files: set[tuple[str, str, str]] = set()  # (root, key, sha256): compared already
_checking = threading.Lock()


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
        counts = self.manifest.stages[schema.SEQUENCES].counts
        for name, array in self._seq.items():
            self._check_array(schema.SEQUENCES, name, array, None)
            check_stored(array, self.root)
        self.offsets = self._whole("offsets")  # (S+1,) int64
        self.label_offsets = self._whole("label_offsets")  # (S+1,) int64
        self.source_index = self._whole("source_index")  # (S,) int64
        n_tokens = self._seq["input_ids"].shape[0]
        problem = integrity.sequence_problem(self.offsets, self.label_offsets, n_tokens, counts)
        if problem is None and len(self.source_index) != len(self.offsets) - 1:
            problem = "source_index: not one entry per sequence"
        if problem is None and self._seq["label_mask"].shape[0] != n_tokens:
            problem = "label_mask: not one entry per token"
        if problem is not None:
            raise self._refused(schema.SEQUENCES, problem)
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None  # read on first use
        # Arrays are opened once: opening one reads its metadata from the store.
        self._arrays: dict[str, dict[str, zarr.Array]] = {}

    def _whole(self, name: str) -> np.ndarray:
        return self._read(self._seq[name], 0, self._seq[name].shape[0])

    # Checks -------------------------------------------------------------------------------------

    def _refused(self, where: str, why: str) -> CacheError:
        return CacheError(
            f"cache {self.root}/{self.task}/{self.split}/{where}: {why}; run `adaspec-cache "
            f"verify --cache {self.root}`, then rebuild the damaged stage with `adaspec-cache "
            "build ... --rebuild`")

    def _check_array(self, stage: str, name: str, array: zarr.Array, rows: int | None,
                     width: int | None = None) -> None:
        """The array's metadata is the format's (dtype, rows, codecs) and its stage recorded
        its files' digests."""
        if not self.manifest.stages[stage].files:
            raise CacheError(
                f"cache {self.root}/{self.task}/{self.split}: stage '{stage}' records no file "
                "digests (built by an older adaspec); rebuild it with `adaspec-cache build ... "
                "--rebuild`")
        expected = integrity.expected_dtype(stage, name, self.manifest.stages[stage].params,
                                            self.vocab_size)
        problem = integrity.array_problem(array, expected, rows, width)
        if problem is not None:
            raise self._refused(f"{stage}/{name}", problem)

    def _stage_of(self, array: zarr.Array) -> str:
        return array.store_path.path.split("/", 2)[2].rsplit("/", 1)[0]

    def _check_files(self, array: zarr.Array, start: int, stop: int) -> None:
        """Each file holding rows [start, stop) is the one written there (SHA-256), once per
        file and process; a local shard cache's copy that is not is dropped and fetched again."""
        files = self.manifest.stages[self._stage_of(array)].files
        for rel, key, lo, hi in integrity.file_keys(array, start, stop):
            want = files.get(rel)
            if (self.root, key, want) in _checked_files:
                continue
            got = self._file_digest(array, key)
            store = array.store_path.store
            if got != want and hasattr(store, "drop"):
                store.drop(key)  # the local copy: fetch the store's own again
                got = self._file_digest(array, key)
            if got != want:
                read_rows(array, lo, hi, self.root)  # damage inside: names the chunk first
                raise self._refused(
                    f"{rel} (rows {lo}-{hi})", "not the file written there (its SHA-256 differs "
                    "from the manifest's: another shard's or another cache's file, or damage)"
                    if want is not None else "a file the manifest does not record")
            with _checking:
                _checked_files.add((self.root, key, want))

    def _file_digest(self, array: zarr.Array, key: str) -> str | None:
        try:
            data = integrity.read_file(array, key)
        except Exception as err:  # the store's client: connection lost, timeout, ...
            reason = (str(err).splitlines() or [""])[0][:120] or type(err).__name__
            raise CacheError(
                f"cannot read {self.root}/{key} ({type(err).__name__}: {reason}); check that the "
                "store is reachable (and the local shard cache folder readable), then run "
                "again") from None
        return None if data is None else integrity.sha256(data)

    def _read(self, array: zarr.Array, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an array whose files are checked first."""
        self._check_files(array, start, stop)
        return read_rows(array, start, stop, self.root)

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
        data, offsets = (self._read(a, 0, a.shape[0]) for a in arrays)
        raw = data.tobytes()
        return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    # Rows ---------------------------------------------------------------------------------------

    def all_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sequence's tokens (int64) and label mask (bool), concatenated; read once and
        held (2-4 B per token stored, no logits). A bounded-memory reader uses `token_rows`."""
        if self._tokens is None:
            ids = self._whole("input_ids")
            problem = integrity.token_problem(ids, self.vocab_size)
            if problem is not None:
                raise self._refused("sequences/input_ids", problem)
            self._tokens = (ids.astype(np.int64), self._whole("label_mask").astype(bool))
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
        ids = self._read(self._seq["input_ids"], start, stop)
        problem = integrity.token_problem(ids, self.vocab_size)
        if problem is not None:
            raise self._refused("sequences/input_ids", f"rows {start}-{stop}: {problem}")
        return ids, self._read(self._seq["label_mask"], start, stop).astype(bool)

    def _stage_arrays(self, stage: str) -> dict[str, zarr.Array]:
        if stage not in self._arrays:
            group = member(self.group, stage, self.root)
            params = self.manifest.stages[stage].params
            specs = schema.stage_arrays(stage, params, self.vocab_size)
            arrays = {name: member(group, name, self.root) for name in specs}
            for name, array in arrays.items():
                self._check_array(stage, name, array, self.n_label_rows, specs[name].width)
                check_stored(array, self.root)
            self._arrays[stage] = arrays
        return self._arrays[stage]

    def stored_rows(self, stage: str, start: int, stop: int,
                    names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a row stage's arrays as stored (not decoded)."""
        arrays = self._stage_arrays(stage)
        rows = {name: self._read(arrays[name], start, stop)
                for name in (names if names is not None else arrays)}
        if stage == schema.TARGET and set(rows) == set(arrays):  # checked as decoded
            self._check_target(schema.decode_target_rows(rows, self.target_params), start, stop)
        return rows

    def _check_target(self, decoded: dict[str, np.ndarray], start: int, stop: int) -> None:
        problem = integrity.target_problem(decoded, self.target_params, self.vocab_size)
        if problem is not None:
            raise self._refused(schema.TARGET, f"rows {start}-{stop}: {problem}")

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
        arrays = self._stage_arrays(schema.TARGET)
        stored = {name: self._read(array, start, stop) for name, array in arrays.items()}
        decoded = self.decode_target(stored)
        self._check_target(decoded, start, stop)
        return decoded

    def ref_losses(self, name: str, divergence: str, start: int, stop: int) -> np.ndarray:
        """(n,) float32 per-token losses of reference `name` for label rows [start, stop)."""
        stage = schema.ref_group_name(name)
        self.ref_stage(name)
        losses = self.stored_rows(stage, start, stop, [f"loss_{divergence}"])[f"loss_{divergence}"]
        problem = integrity.ref_problem(losses)
        if problem is not None:
            raise self._refused(f"{stage}/loss_{divergence}", f"rows {start}-{stop}: {problem}")
        return losses.astype(np.float32)
