"""The batch stream: seeded order, exact coverage, rank split, padded batches, resume skipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import GSM8K, REPO, save_tiny_model

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
    save_tiny_model(ref_dir, tiny_tokenizer, n_layers=1, seed=4)
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


# ---------------------------------------------------------------------------------------------
# The in-memory stream against a plain per-sequence read, in both memory modes


def _plain_batch(reader, indices):
    """What a batch must hold, read the slow, obvious way: one sequence at a time."""
    rows = [reader.target_rows(int(reader.label_offsets[s]), int(reader.label_offsets[s + 1]))
            for s in indices]
    ref = [reader.ref_losses("ref", "fkl", int(reader.label_offsets[s]),
                             int(reader.label_offsets[s + 1])) for s in indices]
    pairs = [reader.sequence(int(s)) for s in indices]
    padded = labels.pad_batch([p[0] for p in pairs], [p[1] for p in pairs], 7)
    return padded, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}, np.concatenate(ref)


# A budget below the split's ~60 KB of rows and tokens: blocks, a windowed shuffle.
BUDGETS = {"whole": 64.0, "blocks": 0.012}


@pytest.mark.parametrize("mode", list(BUDGETS))
@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("world", [1, 2])
def test_batches_equal_a_per_sequence_read(cache, mode, seed, world):
    reader = _reader(cache)
    streams = [BatchStream(reader, 2, seed, 7, with_target=True, ref=("ref", "fkl"), rank=r,
                           world_size=world, memory_budget_mb=BUDGETS[mode])
               for r in range(world)]
    assert streams[0].blocks.whole == (mode == "whole")
    if mode == "blocks":
        assert streams[0].blocks.n_blocks > 3
    per_epoch = streams[0].batches_per_epoch
    seen = []
    for stream in streams:
        for batch in stream.batches(0, 2 * per_epoch):
            padded, rows, ref = _plain_batch(reader, batch.sequences)
            for name in ("input_ids", "attention_mask", "index_b", "index_t"):
                assert torch.equal(getattr(batch, name), getattr(padded, name)), name
            assert batch.n_tokens == int(padded.attention_mask.sum())
            np.testing.assert_array_equal(batch.target.ids.numpy(), rows["ids"])
            np.testing.assert_array_equal(batch.target.logprobs.numpy(), rows["logprobs"])
            np.testing.assert_array_equal(batch.target.tail_logmass.numpy(),
                                          rows["tail_logmass"])
            np.testing.assert_array_equal(batch.ref_loss.numpy(), ref)
            if batch.position < per_epoch:
                seen.extend(batch.sequences.tolist())
    # One epoch over all processes covers each sequence at most once (a ragged tail dropped).
    assert len(seen) == len(set(seen)) >= reader.n_sequences - 2 * world + 1


def test_whole_mode_keeps_the_plain_seeded_permutation(cache):
    reader = _reader(cache)
    stream = BatchStream(reader, 3, 4, 0, with_target=True)
    assert stream.blocks.whole
    np.testing.assert_array_equal(stream.order(2),
                                  np.random.default_rng((4, 2)).permutation(reader.n_sequences))


def test_windowed_order_is_seeded_covers_everything_and_resumes_exactly(cache):
    reader = _reader(cache)

    def stream():
        return BatchStream(reader, 2, 9, 0, with_target=True, ref=("ref", "fkl"),
                           memory_budget_mb=BUDGETS["blocks"])

    a, b = stream(), stream()
    for epoch in range(2):
        order = a.order(epoch)
        assert sorted(order.tolist()) == list(range(reader.n_sequences))
        np.testing.assert_array_equal(order, b.order(epoch))
    assert not np.array_equal(a.order(0), a.order(1))
    full = list(a.batches(0, 9))
    tail = list(b.batches(5, 9))  # a fresh stream resumed at batch 5 (across an epoch end)
    for x, y in zip(full[5:], tail, strict=True):
        assert x.position == y.position
        np.testing.assert_array_equal(x.sequences, y.sequences)
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.target.ids, y.target.ids) and torch.equal(x.ref_loss, y.ref_loss)
    assert len(a.blocks.held) <= 8  # BLOCKS_HELD


RSS_SCRIPT = r"""
import sys, threading, time
import psutil
from cache_tools.store import CacheReader
from adaspec.stream import BatchStream

root, budget, epochs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
process = psutil.Process()
reader = CacheReader(root, "toy", "train")
before = process.memory_info().rss
peak, done = [before], threading.Event()

def watch():  # the current RSS, sampled: ru_maxrss would still hold the imports' peak
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)

watcher = threading.Thread(target=watch)
watcher.start()
stream = BatchStream(reader, 4, 0, 0, with_target=True, memory_budget_mb=budget)
rows = 0
for batch in stream.batches(0, int(epochs * stream.batches_per_epoch)):
    rows += batch.n_labels
done.set()
watcher.join()
print(stream.blocks.whole, stream.blocks.n_blocks, rows, (peak[0] - before) / 2**20)
"""


def test_peak_memory_of_a_stream_over_a_cache_ten_times_its_budget(tmp_path):
    """A cache 10x larger than the budget streams within the budget (peak RSS growth).

    Reading has a fixed cost of its own (zarr's buffers and event loop, the reader threads),
    measured the same way with a budget of almost nothing: the rows the stream holds must fit
    the budget on top of it, far below what holding the data would take.
    """
    import subprocess
    import sys

    from cache_tools import schema
    from cache_tools.store import CacheWriter

    rng = np.random.default_rng(0)
    k, vocab, n_seq, length = 32, 50000, 3000, 400  # 960k label rows x 160 B ~ 146 MB
    writer = CacheWriter(str(tmp_path / "c"), "toy", "train")
    ids = [rng.integers(0, vocab, size=length) for _ in range(n_seq)]
    masks = [np.arange(length) >= 80 for _ in range(n_seq)]
    counts = writer.write_sequences(ids, masks, list(range(n_seq)), vocab,
                                    {schema.TOKENIZER_FINGERPRINT: "toy"})
    params = {schema.MODE: "sample", schema.K: k, schema.VALUE_ENCODING: "uint8q",
              schema.ID_ENCODING: "plain"}
    stage = writer.open_stage(schema.TARGET, params, vocab, 65536, 4096)
    for shard in stage.pending_shards():
        a, b = stage.shard_range(shard)
        stage.write_stored_shard(shard, {
            "ids": rng.integers(0, vocab, size=(b - a, k)).astype(np.uint16),
            "logprobs": rng.integers(0, 255, size=(b - a, k)).astype(np.uint8),
            "counts": np.ones((b - a, k), dtype=np.uint16)})
    stage.finish()
    data_mb = (counts["label_tokens"] * k * 5 + counts["tokens"] * 3) / 2**20
    budget = data_mb / 10

    def grown(budget_mb: float, epochs: float) -> tuple[str, int, int, float]:
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "c"),
                              str(budget_mb), str(epochs)], capture_output=True, text=True,
                             timeout=600, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        whole, n_blocks, seen, mb = out.stdout.split()
        return whole, int(n_blocks), int(seen), float(mb)

    fixed = grown(budget / 50, 0.05)[3]
    whole, n_blocks, seen, mb = grown(budget, 1.5)
    print(f"data {data_mb:.0f} MB, budget {budget:.1f} MB: peak RSS growth {mb:.1f} MB "
          f"(reading alone {fixed:.1f} MB)")
    assert whole == "False" and n_blocks >= 10 and seen >= counts["label_tokens"]
    assert mb <= budget * 1.25 + fixed + 4  # batches in flight and one block being decoded
    assert mb < data_mb / 3
