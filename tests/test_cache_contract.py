"""The cache protocol, as a contract between `CacheWriter` and `CacheReader` (numpy only).

Whatever a writer is given comes back from a reader, for every mode and encoding; a stage is
complete only when `finish()` says so; the manifest a writer keeps is what the reader answers
(vocabulary size, tokenizer fingerprint, stage params, recorded references); a store written
before the typed manifest existed still reads.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zarr

from cache_tools import schema
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest
from cache_tools.store import CacheReader, CacheWriter

VOCAB, K = 300, 6


def _sequences(rng, n_seq=9):
    lengths = rng.integers(6, 20, size=n_seq)
    ids = [rng.integers(0, VOCAB, size=n) for n in lengths]
    masks = [np.arange(n) >= n // 3 for n in lengths]
    return ids, masks


def _rows(rng, n: int, mode: str) -> dict[str, np.ndarray]:
    """Computed target rows (float32 / int64) as a build hands them to the encoder."""
    logits = rng.normal(size=(n, VOCAB)) * 2
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    if mode == "topk":
        ids = np.argsort(-logprobs, axis=-1)[:, :K]
        values = np.take_along_axis(logprobs, ids, -1)
        tail = np.log1p(-np.exp(values).sum(-1))
        return {"ids": ids, "logprobs": values.astype(np.float32),
                "tail_logmass": tail.astype(np.float32)}
    ids = np.stack([rng.choice(VOCAB, size=K, replace=False) for _ in range(n)])
    # K draws per row, as a sampled build makes them (verify and the readers check the sum).
    counts = rng.multinomial(K - 1, np.full(K, 1.0 / K), size=n).astype(np.float32)
    counts[:, 0] += 1
    ids = np.where(counts > 0, ids, 0)
    values = np.where(counts > 0, np.take_along_axis(logprobs, ids, -1), 0.0)
    return {"ids": ids, "logprobs": values.astype(np.float32), "counts": counts}


def _write(root, mode, value_encoding, id_encoding, seed=0):
    rng = np.random.default_rng(seed)
    writer = CacheWriter(str(root), "toy", "train")
    ids, masks = _sequences(rng)
    counts = writer.write_sequences(ids, masks, list(range(len(ids))), VOCAB,
                                    {schema.TOKENIZER_FINGERPRINT: "fp-1", "note": "x"})
    rows = _rows(rng, counts["label_tokens"], mode)
    params = {schema.MODE: mode, schema.K: K, schema.VALUE_ENCODING: value_encoding,
              schema.ID_ENCODING: id_encoding}
    stage = writer.open_stage(schema.TARGET, params, VOCAB, 16, 8)
    return writer, stage, rows, (ids, masks)


def _fill(stage, rows, shards=None):
    """Hand the writer computed rows, shard by shard: it encodes them with the stage's format."""
    for shard in stage.pending_shards() if shards is None else shards:
        a, b = stage.shard_range(shard)
        stage.write_shard(shard, {name: v[a:b] for name, v in rows.items()})


@pytest.mark.parametrize("mode, value_encoding, id_encoding", list(itertools.product(
    schema.SPARSE_MODES, schema.VALUE_ENCODINGS, schema.ID_ENCODINGS)))
def test_what_is_written_is_read_back(tmp_path, mode, value_encoding, id_encoding):
    writer, stage, rows, (ids, masks) = _write(tmp_path / "c", mode, value_encoding, id_encoding)
    _fill(stage, rows)
    assert stage.finish() == {"label_tokens": stage.n_rows, "shards": stage.n_shards}
    reader = CacheReader(str(tmp_path / "c"), "toy", "train")
    assert reader.vocab_size == VOCAB and reader.tokenizer_fingerprint == "fp-1"
    assert reader.sequence_params["note"] == "x" and reader.target_params[schema.MODE] == mode
    for s, (want_ids, want_mask) in enumerate(zip(ids, masks, strict=True)):
        got_ids, got_mask = reader.sequence(s)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_mask, want_mask)
    got = reader.target_rows(0, reader.n_label_rows)
    # Entries may be reordered by the id encoding; each row holds the same (id, value) pairs,
    # and the first entry (the top-1 of a top-K row) stays first.
    # uint8q rounds to 1/16 nat; float16 keeps 11 bits (|log p| < 20 here: < 0.01)
    tolerance = 0.5 * schema.UINT8Q_STEP + 1e-6 if value_encoding == "uint8q" else 0.01
    for r in range(len(rows["ids"])):
        want = dict(zip(rows["ids"][r].tolist(), rows["logprobs"][r].tolist(), strict=True))
        have = dict(zip(got["ids"][r].tolist(), got["logprobs"][r].tolist(), strict=True))
        assert want.keys() == have.keys()
        assert max(abs(want[i] - have[i]) for i in want) <= tolerance
        assert got["ids"][r, 0] == rows["ids"][r, 0]
        if mode == "sample":
            want_c = dict(zip(rows["ids"][r].tolist(), rows["counts"][r].tolist(), strict=True))
            have_c = dict(zip(got["ids"][r].tolist(), got["counts"][r].tolist(), strict=True))
            assert want_c == have_c
    if mode == "topk":
        np.testing.assert_array_equal(got["tail_logmass"], rows["tail_logmass"])
    # Any Zarr v3 reader opens it.
    plain = zarr.open_group(str(tmp_path / "c"), mode="r")
    assert plain["toy/train/target/ids"].shape == (reader.n_label_rows, K)


def test_the_writer_encodes_computed_rows_as_the_schema_says(tmp_path):
    """Callers hand the writer computed rows (float32, int64); it stores them encoded with the
    stage's encodings, the same bytes as a copy of already encoded arrays."""
    _, computed, rows, _ = _write(tmp_path / "a", "sample", "uint8q", "delta")
    _fill(computed, rows)
    _, copied, _, _ = _write(tmp_path / "b", "sample", "uint8q", "delta")
    encoded = schema.encode_target_rows(rows, "uint8q", "delta", VOCAB)
    for shard in copied.pending_shards():
        a, b = copied.shard_range(shard)
        copied.write_stored_shard(shard, {name: v[a:b] for name, v in encoded.items()})
    for name, spec in schema.target_arrays("sample", K, "uint8q", VOCAB).items():
        got = zarr.open_group(str(tmp_path / "a"), mode="r")[f"toy/train/target/{name}"]
        want = zarr.open_group(str(tmp_path / "b"), mode="r")[f"toy/train/target/{name}"]
        assert got.dtype == spec.dtype and rows[name].dtype != spec.dtype
        np.testing.assert_array_equal(got[:], want[:])


def test_a_stage_is_complete_only_when_finish_says_so(tmp_path):
    writer, stage, rows, _ = _write(tmp_path / "c", "sample", "uint8q", "delta")
    assert stage.n_shards >= 3
    _fill(stage, rows, shards=[0, 2])
    assert stage.finish() is None  # shard 1 is missing
    assert not writer.manifest.is_complete(schema.TARGET)
    with pytest.raises(CacheError, match="no complete 'target'"):
        CacheReader(str(tmp_path / "c"), "toy", "train")
    # Another process (a new writer on the same store) resumes the missing shards.
    again = CacheWriter(str(tmp_path / "c"), "toy", "train").open_stage(
        schema.TARGET, writer.manifest.target_params, VOCAB, 16, 8, create=False)
    assert again.pending_shards() == [s for s in range(stage.n_shards) if s not in (0, 2)]
    _fill(again, rows)
    assert again.finish() is not None and writer.manifest.is_complete(schema.TARGET)


def test_other_params_are_refused_and_rebuild_replaces(tmp_path):
    writer, stage, rows, _ = _write(tmp_path / "c", "topk", "float16", "plain")
    _fill(stage, rows)
    stage.finish()
    params = {**writer.manifest.target_params, schema.K: K + 1}
    with pytest.raises(CacheError, match=r"was built with k=6 but this run has k=7; fix it"):
        writer.open_stage(schema.TARGET, params, VOCAB, 16, 8, fix="fix it")
    fresh = writer.open_stage(schema.TARGET, params, VOCAB, 16, 8, rebuild=True)
    assert not writer.manifest.is_complete(schema.TARGET)
    assert writer.manifest.target_params[schema.K] == K + 1
    assert fresh.pending_shards() == list(range(fresh.n_shards))  # nothing trusted


def test_recorded_references_and_ref_stages(tmp_path):
    writer, stage, rows, _ = _write(tmp_path / "c", "sample", "uint8q", "delta")
    _fill(stage, rows)
    stage.finish()
    writer.record_ref("ref", {"path": "/runs/ref/model", "weight_hash": "abc"})
    losses = {name: np.arange(stage.n_rows, dtype=np.float32) for name in schema.ref_arrays()}
    ref = writer.open_stage(schema.ref_group_name("ref"), {"model": {"weight_hash": "abc"}},
                            VOCAB, 16, 8)
    _fill(ref, losses)
    ref.finish()
    reader = CacheReader(str(tmp_path / "c"), "toy", "train")
    assert reader.recorded_refs == {"ref": {"path": "/runs/ref/model", "weight_hash": "abc"}}
    assert reader.ref_names() == ["ref"]
    assert reader.ref_stage("ref").params["model"]["weight_hash"] == "abc"
    np.testing.assert_array_equal(reader.ref_losses("ref", "rkl", 3, 7), [3, 4, 5, 6])
    with pytest.raises(CacheError, match="no complete reference 'other'"):
        reader.ref_stage("other")


# What a store written before the typed manifest holds in its attributes (format version 1).
OLD_MANIFEST = {
    "format": "adaspec-logit-cache", "format_version": 1, "package_version": "0.1.0",
    "task": "toy", "split": "train", "vocab_size": 300,
    "stages": {
        "sequences": {"status": "complete", "params": {"tokenizer_fingerprint": "fp-0"},
                      "counts": {"sequences": 2, "tokens": 9, "label_tokens": 4}},
        "target": {"status": "complete", "params": {"mode": "topk", "k": 4},
                   "counts": {"label_tokens": 4, "shards": 1}},
        "ref/ref": {"status": "building", "params": {"model": {}}},
    },
    "refs": {"ref": {"path": "/x", "run": "/r", "init": "a", "loss": "fkl", "epochs": 1.0,
                     "steps": 8}},
}


def test_an_older_manifest_reads_as_it_was_written():
    manifest = Manifest.from_json(OLD_MANIFEST)
    assert manifest.vocab_size == 300 and manifest.tokenizer_fingerprint == "fp-0"
    assert manifest.is_complete("target") and not manifest.is_complete("ref/ref")
    assert manifest.ref_names() == [] and manifest.ref_names(complete_only=False) == ["ref"]
    assert manifest.refs["ref"]["steps"] == 8
    assert manifest.to_json() == OLD_MANIFEST  # nothing lost or reshaped
