"""cache_tools: the store's contract (shards, resume, manifest, verify, info) on numpy data."""

import numpy as np
import pytest
import zarr

from cache_tools import schema, store
from cache_tools.errors import CacheError
from cache_tools.info import cache_summary, format_summary
from cache_tools.verify import verify_cache


def _write_split(root, n_seq=7, k=4, vocab=300, shard_rows=16, chunk_rows=8, encoding="float16"):
    """Sequences and a target stage opened through CacheWriter, no shard written yet.

    Returns (the split's group, the StageWriter, the encoded rows to write, the CacheWriter).
    """
    rng = np.random.default_rng(0)
    cache_writer = store.CacheWriter(str(root), "toy", "train")
    lengths = rng.integers(5, 12, size=n_seq)
    ids = [rng.integers(0, vocab, size=n) for n in lengths]
    masks = []
    for n in lengths:
        m = np.zeros(n, bool)
        m[n // 2 :] = True
        masks.append(m)
    counts = cache_writer.write_sequences(ids, masks, list(range(n_seq)), vocab,
                                          {schema.TOKENIZER_FINGERPRINT: "toy"})
    n_rows = counts["label_tokens"]
    logits = rng.normal(size=(n_rows, vocab)) * 3
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logprobs, axis=-1)[:, :k]
    top_lp = np.take_along_axis(logprobs, top, -1)
    tail = np.log1p(-np.exp(top_lp).sum(-1))
    rows = {
        "ids": top.astype(schema.id_dtype(vocab)),
        "logprobs": schema.encode_logprobs(top_lp.astype(np.float32), encoding),
        "tail_logmass": tail.astype(np.float32),
    }
    params = {schema.MODE: "topk", schema.K: k, schema.VALUE_ENCODING: encoding}
    writer = cache_writer.open_stage(schema.TARGET, params, vocab, shard_rows, chunk_rows)
    return cache_writer.group, writer, rows, cache_writer


def _finish(group, writer, rows, cache_writer):
    for shard in writer.pending_shards():
        a, b = writer.shard_range(shard)
        writer.write_stored_shard(shard, {name: v[a:b] for name, v in rows.items()})
    assert writer.finish() == {"label_tokens": writer.n_rows, "shards": writer.n_shards}


def test_round_trip_and_plain_zarr(tmp_path):
    group, writer, rows, manifest = _write_split(tmp_path / "c")
    _finish(group, writer, rows, manifest)
    reader = store.CacheReader(str(tmp_path / "c"), "toy", "train")
    got = reader.target_rows(0, reader.n_label_rows)
    np.testing.assert_array_equal(got["ids"], rows["ids"].astype(np.int64))
    np.testing.assert_allclose(got["logprobs"], rows["logprobs"].astype(np.float32))
    # Any Zarr v3 reader sees plain arrays.
    plain = zarr.open_group(str(tmp_path / "c"), mode="r")
    assert plain["toy/train/target/ids"].shape == rows["ids"].shape
    assert plain.attrs["format"] == schema.FORMAT_NAME


def test_pending_shards_resume_and_split_between_processes(tmp_path):
    group, writer, rows, manifest = _write_split(tmp_path / "c", n_seq=12)
    assert writer.n_shards >= 3
    all_shards = writer.pending_shards()
    assert sorted(writer.pending_shards(0, 2) + writer.pending_shards(1, 2)) == all_shards
    a, b = writer.shard_range(1)
    writer.write_stored_shard(1, {name: v[a:b] for name, v in rows.items()})
    assert 1 not in writer.pending_shards() and not writer.all_done()
    # A reader refuses the stage until its status is complete.
    with pytest.raises(CacheError, match="no complete 'target'"):
        store.CacheReader(str(tmp_path / "c"), "toy", "train")
    _finish(group, writer, rows, manifest)
    assert writer.all_done()


def test_verify_passes_then_names_a_corrupted_chunk(tmp_path):
    root = tmp_path / "c"
    group, writer, rows, manifest = _write_split(root)
    _finish(group, writer, rows, manifest)
    report = verify_cache(str(root))
    assert report.ok, report.message
    shard_files = sorted((root / "toy/train/target/logprobs/c").rglob("*"))
    shard_files = [f for f in shard_files if f.is_file()]
    victim = shard_files[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify_cache(str(root))
    assert not report.ok
    assert "target/logprobs" in report.message and "rows" in report.message


def test_verify_catches_mass_that_does_not_add_up(tmp_path):
    root = tmp_path / "c"
    group, writer, rows, manifest = _write_split(root)
    rows["tail_logmass"] = rows["tail_logmass"] + 1.0  # claims more tail than exists
    _finish(group, writer, rows, manifest)
    report = verify_cache(str(root))
    assert not report.ok and "mass" in report.message


def test_check_params_names_the_difference():
    with pytest.raises(CacheError) as err:
        store.check_params(
            "cache stage 'target'",
            {"k": 32, "mode": "topk"},
            {"k": 64, "mode": "topk"},
            "use a new --cache",
        )
    assert "k=32" in str(err.value) and "k=64" in str(err.value)


def test_lock_refuses_a_second_builder(tmp_path):
    with store.build_lock(str(tmp_path), "toy", "train"):
        with pytest.raises(CacheError, match="another build"):
            with store.build_lock(str(tmp_path), "toy", "train"):
                pass
    with store.build_lock(str(tmp_path), "toy", "train"):  # released after the first
        pass


def test_not_a_cache_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "other"), mode="w").create_group("x")
    with pytest.raises(CacheError, match="not a logit cache"):
        store.open_root(str(tmp_path / "other"), mode="a")


def test_uint8q_round_trip_error_is_bounded():
    lp = -np.random.default_rng(1).exponential(3.0, size=(100, 8)).astype(np.float32)
    back = schema.decode_logprobs(schema.encode_logprobs(lp, "uint8q"), "uint8q")
    inside = lp > -15.9
    assert np.max(np.abs(back - lp)[inside]) <= schema.UINT8Q_STEP / 2 + 1e-6


def test_info_reports_bytes_per_token(tmp_path):
    root = tmp_path / "c"
    group, writer, rows, manifest = _write_split(root)
    _finish(group, writer, rows, manifest)
    records = cache_summary(str(root))
    target = [s for s in records[0]["stages"] if s["stage"] == schema.TARGET][0]
    assert target["status"] == schema.STATUS_COMPLETE
    assert target["bytes_per_label_token"] > 0
    assert "B/label token" in format_summary(str(root), records)


def test_info_of_a_relative_cache_path(tmp_path, monkeypatch):
    """zarr's nbytes_stored failed on a store opened by a relative path (FileNotFoundError)."""
    root = tmp_path / "c"
    group, writer, rows, manifest = _write_split(root)
    _finish(group, writer, rows, manifest)
    monkeypatch.chdir(tmp_path)
    assert cache_summary("c") == cache_summary(str(root))


def test_delta_id_encoding_round_trips_with_values_following():
    rng = np.random.default_rng(3)
    ids = np.stack([rng.choice(5000, 16, replace=False) for _ in range(20)]).astype(np.uint16)
    values = rng.normal(size=(20, 16)).astype(np.float32)
    counts = rng.integers(1, 5, size=(20, 16)).astype(np.uint16)
    stored, v2, c2 = schema.encode_rows(ids, values, counts, "delta")
    back = schema.decode_ids(stored, "delta")
    np.testing.assert_array_equal(back[:, 0], ids[:, 0])  # the first (top-1) entry stays first
    assert np.all(np.diff(back[:, 1:], axis=-1) > 0)  # the rest sorted
    for row in range(20):
        pairs = zip(values[row].tolist(), counts[row].tolist(), strict=True)
        original = dict(zip(ids[row].tolist(), pairs, strict=True))
        pairs = zip(v2[row].tolist(), c2[row].tolist(), strict=True)
        assert dict(zip(back[row].tolist(), pairs, strict=True)) == original


def test_a_split_copied_under_another_name_is_refused(tmp_path):
    """The manifest records its task and split: a copy under another name is not that split."""
    import shutil

    root = tmp_path / "cache"
    writer = store.CacheWriter(str(root), "gsm8k", "train")
    writer.write_sequences([np.array([1, 2, 3])], [np.array([False, True, True])], [0], 10,
                           {schema.TOKENIZER_FINGERPRINT: "x"})
    shutil.copytree(root / "gsm8k" / "train", root / "gsm8k" / "test")
    store.CacheReader(str(root), "gsm8k", "train", require=())
    with pytest.raises(CacheError, match="copied or renamed"):
        store.CacheReader(str(root), "gsm8k", "test", require=())


def test_a_folder_that_is_not_a_cache_is_refused_untouched(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    v2 = tmp_path / "v2"
    zarr.open_group(str(v2), mode="w", zarr_format=2)
    for folder, word in ((foreign, "not a cache"), (v2, "Zarr v2")):
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(CacheError, match=word):
            store.CacheWriter(str(folder), "gsm8k", "train").write_sequences(
                [np.array([1, 2])], [np.array([False, True])], [0], 10,
                {schema.TOKENIZER_FINGERPRINT: "x"})
        with pytest.raises(CacheError, match=word):
            with store.build_lock(str(folder), "gsm8k", "train"):
                pass
        assert sorted(p.name for p in folder.iterdir()) == before


def test_a_cache_that_cannot_be_written_is_one_line_at_the_lock(tmp_path, monkeypatch):
    """A read-only cache: build died with a traceback writing its lock. (As root nothing is
    read-only: the refusal of the lease's write is simulated.)"""
    from cache_tools import lease

    def refusing(self, key, data):
        raise PermissionError(13, "Permission denied", str(self.root / key))

    store.open_root(str(tmp_path / "cache"), "a")
    monkeypatch.setattr(lease.LocalObjects, "create", refusing)
    with pytest.raises(CacheError, match="cannot write the cache") as err:
        with store.build_lock(str(tmp_path / "cache"), "gsm8k", "train"):
            pass
    assert "\n" not in str(err.value)
