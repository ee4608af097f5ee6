"""The batch stream: seeded order, exact coverage, rank split, padded batches, resume skipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from test_build import GSM8K

from adaspec import labels
from adaspec.build import build_stage
from adaspec.config import build_config
from adaspec.stream import BatchStream, online_sequences, prefetch
from cache_tools import store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A tiny cache of 12 gsm8k rows with a target stage and reference losses."""
    root = tmp_path_factory.mktemp("stream")
    cfg = build_config({
        "models": {"target": str(tiny_model_dir)},
        "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 12, "max_length": 512},
        "cache": {"cache": str(root / "cache"), "topk": 8, "shard_rows": 256, "chunk_rows": 128,
                  "batch_tokens": 1024, "sparse": "topk", "value_encoding": "float16"},
    })
    build_stage(cfg, "target", progress=False)
    ref_dir = root / "ref"
    make_tiny_model(len(tiny_tokenizer), n_layers=1, seed=4).save_pretrained(ref_dir)
    tiny_tokenizer.save_pretrained(ref_dir)
    build_stage(cfg, "ref", str(ref_dir), progress=False)
    return cfg


def _reader(cfg):
    return store.CacheReader(cfg.cache.cache, "gsm8k", "train")


def _positions(stream: BatchStream, epoch: int) -> list[np.ndarray]:
    n = stream.batches_per_epoch
    return [stream.batch_indices(p) for p in range(epoch * n, (epoch + 1) * n)]


def test_order_is_seeded_differs_per_epoch_and_covers_every_sequence_once(cache):
    reader = _reader(cache)
    assert reader.n_sequences == 12
    a, b = BatchStream(reader, 5, seed=3, pad_id=0), BatchStream(reader, 5, seed=3, pad_id=0)
    assert a.batches_per_epoch == 3  # 5 + 5 + 2: the short last batch is kept in one process
    for epoch in range(3):
        got = np.concatenate(_positions(a, epoch))
        assert sorted(got.tolist()) == list(range(12))
        np.testing.assert_array_equal(got, np.concatenate(_positions(b, epoch)))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), BatchStream(reader, 5, seed=4, pad_id=0).order(0))


def test_ranks_take_disjoint_batches_and_the_same_number(cache):
    reader = _reader(cache)
    # 12 sequences in batches of 5 -> 3 batches; 2 processes take 1 each, the third is dropped.
    ranks = [BatchStream(reader, 5, seed=0, pad_id=0, rank=r, world_size=2) for r in range(2)]
    assert [s.batches_per_epoch for s in ranks] == [1, 1]
    for epoch in range(2):
        seen = [np.concatenate(_positions(s, epoch)) for s in ranks]
        assert not set(seen[0]) & set(seen[1])
        order = ranks[0].order(epoch)
        np.testing.assert_array_equal(np.concatenate(seen), order[:10])
    # 12 in batches of 3 -> 4 batches: ranks alternate batches 0, 2 and 1, 3.
    ranks = [BatchStream(reader, 3, seed=0, pad_id=0, rank=r, world_size=2) for r in range(2)]
    order = ranks[0].order(0)
    np.testing.assert_array_equal(ranks[1].batch_indices(1), order[9:12])


def test_batches_are_padded_and_indexed_like_the_cache(cache, tiny_tokenizer):
    reader = _reader(cache)
    stream = BatchStream(reader, 4, seed=1, pad_id=99, with_target=True, ref=("ref", "fkl"))
    batches = list(stream.batches(0, stream.batches_per_epoch))
    assert [b.position for b in batches] == [0, 1, 2]
    for batch in batches:
        rows, ref = [], []
        for b, s in enumerate(batch.sequences):
            ids, mask = reader.sequence(int(s))
            width = batch.input_ids.shape[1]
            assert width == max(len(reader.sequence(int(x))[0]) for x in batch.sequences)
            np.testing.assert_array_equal(batch.input_ids[b, : len(ids)].numpy(), ids)
            assert torch.all(batch.input_ids[b, len(ids):] == 99)
            assert batch.attention_mask[b].sum() == len(ids)
            a, z = int(reader.label_offsets[s]), int(reader.label_offsets[s + 1])
            rows.append(reader.target_rows(a, z))
            ref.append(reader.ref_losses("ref", "fkl", a, z))
            # this sequence's label rows, in order, predict its label tokens
            sel = batch.index_b == b
            np.testing.assert_array_equal(batch.index_t[sel].numpy() + 1, np.nonzero(mask)[0])
            np.testing.assert_array_equal(batch.label_ids[sel].numpy(), ids[mask])
        assert batch.n_labels == sum(len(r["ids"]) for r in rows)
        np.testing.assert_array_equal(batch.target.ids.numpy(),
                                      np.concatenate([r["ids"] for r in rows]))
        np.testing.assert_array_equal(batch.target.logprobs.numpy(),
                                      np.concatenate([r["logprobs"] for r in rows]))
        np.testing.assert_array_equal(batch.ref_loss.numpy(), np.concatenate(ref))
        # The stream pads exactly as every other phase does (labels.pad_batch).
        pairs = [reader.sequence(int(s)) for s in batch.sequences]
        padded = labels.pad_batch([p[0] for p in pairs], [p[1] for p in pairs], 99)
        for name in ("input_ids", "attention_mask", "index_b", "index_t"):
            assert torch.equal(getattr(batch, name), getattr(padded, name)), name


def test_start_batch_skips_exactly_the_consumed_batches_across_epochs(cache):
    reader = _reader(cache)
    stream = BatchStream(reader, 5, seed=2, pad_id=0, with_target=True)
    full = list(stream.batches(0, 7))  # epochs 0, 1 and the first batch of epoch 2
    tail = list(stream.batches(4, 7))
    assert [b.position for b in tail] == [4, 5, 6]
    for a, b in zip(full[4:], tail, strict=True):
        np.testing.assert_array_equal(a.sequences, b.sequences)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target.ids, b.target.ids)
    np.testing.assert_array_equal(full[3].sequences, stream.order(1)[:5])
    endless = stream.batches(1)  # stop_batch None: runs on; closing it stops the reader thread
    assert [next(endless).position for _ in range(5)] == [1, 2, 3, 4, 5]
    endless.close()


def test_online_sequences_equal_the_cached_ones(cache, tiny_tokenizer):
    reader = _reader(cache)
    online = online_sequences(cache, tiny_tokenizer)
    assert online.n_sequences == reader.n_sequences
    np.testing.assert_array_equal(online.label_offsets, reader.label_offsets)
    for i in range(reader.n_sequences):
        for x, y in zip(online.sequence(i), reader.sequence(i), strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="CacheReader"):
        BatchStream(online, 2, 0, 0, with_target=True)


def test_prefetch_hands_errors_to_the_consumer():
    def make(x):
        if x == 3:
            raise RuntimeError("bad row 3")
        return x * 10

    got = []
    with pytest.raises(RuntimeError, match="bad row 3"):
        for value in prefetch(make, range(6), 2):
            got.append(value)
    assert got == [0, 10, 20]
