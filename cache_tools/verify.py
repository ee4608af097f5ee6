"""Integrity check of a cache: read every chunk and test what the format promises.

Checks, per `<task>/<split>`: every file is the one written there (its SHA-256 against the
manifest's), every array has the format's dtype, shape and codecs, the manifest's counts agree
with the arrays, every chunk decodes (crc32c checksums, shard indexes), shapes agree with the
sequence offsets, and the values pass `integrity`'s checks (the ones the readers apply): token
ids inside the vocabulary, log-probs <= 0, top-K mass plus tail mass 1 within the value
encoding's tolerance, sampled counts adding up, finite reference losses. The first failure is
reported by array, chunk and rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cache_tools import integrity, schema, store
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest

MASS_TOLERANCE = integrity.MASS_TOLERANCE


@dataclass
class VerifyReport:
    ok: bool
    checked_chunks: int
    message: str


class _Bad(Exception):
    pass


def _blocks(n_rows: int, step: int) -> Iterator[tuple[int, int, int]]:
    for i, start in enumerate(range(0, n_rows, step)):
        yield i, start, min(n_rows, start + step)


def _read(array, start: int, stop: int, where: str) -> np.ndarray:
    try:
        return array[start:stop]
    except Exception as err:  # zarr raises ValueError/RuntimeError/blosc errors on corruption
        raise _Bad(f"{where}: cannot be read ({type(err).__name__}: {str(err)[:120]})") from None


def _read_chunks(array, start: int, stop: int, where: str) -> None:
    """Decode rows [start, stop) chunk by chunk: the first that cannot be read is named."""
    step = array.chunks[0]
    for _, lo, hi in _blocks(stop - start, step):
        _read(array, start + lo, start + hi,
              f"{where} chunk {(start + lo) // step} (rows {start + lo}-{start + hi})")


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"


def _check_stored(group, path: str, root: str, manifest: Manifest) -> None:
    """Every array the format says a stage holds has its metadata and every chunk file (none
    reads as zeros); the `_done` markers too."""
    for stage, entry in manifest.stages.items():
        names = schema.stage_array_names(stage, entry.params, int(manifest.vocab_size or 1))
        if stage != schema.SEQUENCES:
            names.append(schema.DONE)
        try:
            stage_group = store.member(group, stage, root)
            for name in names:
                store.check_stored(store.member(stage_group, name, root), root)
        except CacheError as err:
            raise _Bad(str(err).split(": the store is damaged")[0]) from None


def _check_arrays_and_files(group, path: str, manifest: Manifest, n_rows: int | None) -> None:
    """Each array's metadata is the format's and each of its files the one the manifest
    recorded (SHA-256), before any is decoded; with `n_rows`, the row stages hold that many
    label rows, as the manifest counts."""
    vocab_size = int(manifest.vocab_size or 1)
    for stage, entry in manifest.stages.items():
        if not entry.files:
            raise _Bad(f"{path}/{stage}: no file digests recorded (built by an older adaspec); "
                       "rebuild it")
        if (n_rows is not None and stage != schema.SEQUENCES
                and int(entry.counts.get("label_tokens", n_rows)) != n_rows):
            raise _Bad(f"{path}/{stage}: the manifest counts {entry.counts['label_tokens']} "
                       f"label rows, the sequences hold {n_rows}")
        specs = {} if stage == schema.SEQUENCES else schema.stage_arrays(stage, entry.params,
                                                                         vocab_size)
        stage_group = group[stage]
        names = sorted(stage_group.array_keys()) if stage == schema.SEQUENCES else list(specs)
        for name in names:
            array = stage_group[name]
            width = specs[name].width if name in specs else None
            problem = integrity.array_problem(
                array, integrity.expected_dtype(stage, name, entry.params, vocab_size),
                n_rows if specs else None, width)
            if problem is not None:
                raise _Bad(f"{path}/{stage}/{name}: {problem}")
            if n_rows is not None:
                continue  # the files were compared on the first pass
            for rel, key, lo, hi in integrity.file_keys(array):
                data = integrity.read_file(array, key)
                if data is None or integrity.sha256(data) != entry.files.get(rel):
                    _read_chunks(array, lo, hi, f"{path}/{stage}/{name}")  # damage: the chunk
                    raise _Bad(f"{path}/{rel} (rows {lo}-{hi}): not the file written there (its "
                               "SHA-256 differs from the manifest's: another shard's or another "
                               "cache's file, or damage)")


def _check_sequences(group, path: str, vocab_size: int, counts: dict) -> tuple[int, np.ndarray]:
    seq = group[schema.SEQUENCES]
    arrays = {}
    for name in schema.SEQUENCE_ARRAYS:
        arrays[name] = _read(seq[name], 0, seq[name].shape[0], f"{path}/sequences/{name}")
    offsets, label_offsets = arrays["offsets"], arrays["label_offsets"]
    n_tokens = len(arrays["input_ids"])
    problem = integrity.sequence_problem(offsets, label_offsets, n_tokens, counts)
    if problem is not None:
        raise _Bad(f"{path}/sequences: {problem}")
    if len(arrays["label_mask"]) != n_tokens or len(arrays["source_index"]) != len(offsets) - 1:
        raise _Bad(f"{path}/sequences: label_mask or source_index disagree with the offsets")
    if np.any(arrays["input_ids"] >= vocab_size):
        raise _Bad(f"{path}/sequences/input_ids: token id outside the vocabulary ({vocab_size})")
    per_seq = np.add.reduceat(arrays["label_mask"].astype(np.int64), offsets[:-1])
    if not np.array_equal(np.diff(label_offsets), per_seq) or label_offsets[0] != 0:
        raise _Bad(f"{path}/sequences/label_offsets: disagree with label_mask")
    names = list(schema.SEQUENCE_ARRAYS)
    if schema.TEXT_ARRAYS[0] in seq:  # optional per-sequence records (task chat)
        texts, text_offsets = (_read(seq[name], 0, seq[name].shape[0], f"{path}/sequences/{name}")
                               for name in schema.TEXT_ARRAYS)
        if (len(text_offsets) != len(offsets) or text_offsets[0] != 0
                or text_offsets[-1] != len(texts) or np.any(np.diff(text_offsets) < 0)):
            raise _Bad(f"{path}/sequences/text_offsets: not one record per sequence")
        names += schema.TEXT_ARRAYS
    n_chunks = sum(-(-seq[name].shape[0] // schema.SEQUENCE_CHUNK) for name in names)
    return n_chunks, label_offsets


def _check_target(group, path: str, params: dict, n_rows: int, vocab_size: int) -> int:
    target = group[schema.TARGET]
    encoding = params.get(schema.VALUE_ENCODING, "float16")
    chunk_rows = target["ids"].chunks[0]
    checked = 0
    for i, start, stop in _blocks(n_rows, chunk_rows):
        where = f"{path}/target chunk {i} (rows {start}-{stop})"
        ids = _read(target["ids"], start, stop, where.replace("/target", "/target/ids"))
        rows = {"ids": schema.decode_ids(ids, params.get(schema.ID_ENCODING, "plain"))}
        raw = _read(target["logprobs"], start, stop, where.replace("/target", "/target/logprobs"))
        rows["logprobs"] = schema.decode_logprobs(raw, encoding)
        checked += 2
        if rows["ids"].shape[0] != stop - start:
            raise _Bad(f"{where}: ids {rows['ids'].shape} for {stop - start} rows")
        for name in ("tail_logmass", "counts"):
            if name in target:
                rows[name] = _read(target[name], start, stop,
                                   where.replace("/target", f"/target/{name}"))
                checked += 1
        problem = integrity.target_problem(rows, params, vocab_size)
        if problem is not None:
            raise _Bad(f"{where}: {problem}")
    return checked


def _check_ref(group, path: str, stage: str, n_rows: int) -> int:
    ref = group[stage]
    checked = 0
    for name in ref.array_keys():
        if name == schema.DONE:
            continue
        chunk_rows = ref[name].chunks[0]
        for i, start, stop in _blocks(n_rows, chunk_rows):
            where = f"{path}/{stage}/{name} chunk {i} (rows {start}-{stop})"
            values = _read(ref[name], start, stop, where)
            checked += 1
            problem = integrity.ref_problem(values)
            if problem is not None:
                raise _Bad(f"{where}: {problem}")
    return checked


def verify_cache(root: str) -> VerifyReport:
    """Read every chunk of every complete stage of every split under `root`."""
    root_group = store.open_root(root, mode="r")
    checked = 0
    try:
        splits = store.list_splits(root_group)
    except CacheError as err:
        return VerifyReport(False, 0, str(err).split(": the store is damaged")[0])
    if not splits:
        return VerifyReport(False, 0, f"{root}: no task/split with a manifest")
    try:
        for path in splits:
            try:
                group = root_group[path]
                manifest = Manifest.read(group)
            except Exception as err:  # unreadable or missing metadata (zarr.json) is damage
                raise _Bad(f"{path}: metadata cannot be read ({_reason(err)})") from None
            vocab_size = int(manifest.vocab_size or 1 << 32)
            building = [stage for stage, entry in manifest.stages.items() if not entry.complete]
            if building:
                raise _Bad(f"{path}: stage {building[0]!r} is not complete (a build still "
                           "running, or interrupted: resume it with `adaspec-cache build`)")
            _check_stored(group, path, root, manifest)
            _check_arrays_and_files(group, path, manifest, None)
            n, label_offsets = _check_sequences(
                group, path, vocab_size, manifest.stages[schema.SEQUENCES].counts)
            checked += n
            n_rows = int(label_offsets[-1])
            _check_arrays_and_files(group, path, manifest, n_rows)
            for stage, entry in manifest.stages.items():
                if stage == schema.SEQUENCES:
                    continue
                if stage == schema.TARGET:
                    checked += _check_target(group, path, entry.params, n_rows, vocab_size)
                else:
                    checked += _check_ref(group, path, stage, n_rows)
    except _Bad as bad:
        return VerifyReport(False, checked, str(bad))
    return VerifyReport(
        True, checked, f"{root}: {len(splits)} split(s), {checked} chunks read, all good"
    )
