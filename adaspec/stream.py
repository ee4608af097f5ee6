"""Batches for torch: sequences, their cached target rows and reference losses, in a seeded order.

Each epoch is a permutation of the sequence indices, `np.random.default_rng((seed, epoch))`, cut
into micro-batches of `batch_size` sequences (the last one may be short). Under several processes,
process r takes batches r, r + world, r + 2 world, ... and the ragged tail that would give some
processes one batch more than others is dropped, so every process does the same number of steps.
Batches are numbered globally across epochs (batch b is batch b % per_epoch of epoch
b // per_epoch), so a resumed run restarts at the exact batch it stopped at with `start_batch`.

Only the sequence offsets and one epoch's permutation are held in memory: every batch reads its
tokens and rows from the store when it is built, in a background thread that keeps up to
`PREFETCH` batches ready, so reading and decompressing overlaps the training step.

Online runs read the same sequences built in memory (`online_sequences`, the cache's own
tokenize-and-order code), so cached and online runs see identical batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from adaspec import labels, sparse, tasks
from adaspec.config import Config
from adaspec.labels import LabelBatch
from adaspec.sparse import SparseTarget
from cache_tools.store import CacheReader

PREFETCH = 2  # batches read ahead of the training step


class InMemorySequences:
    """Sequences held in memory, with the `CacheReader` interface the stream reads through."""

    def __init__(self, input_ids: list[np.ndarray], label_masks: list[np.ndarray]):
        self._input_ids = input_ids
        self._label_masks = label_masks
        n_labels = [int(np.count_nonzero(m)) for m in label_masks]
        self.label_offsets = np.concatenate([[0], np.cumsum(n_labels)]).astype(np.int64)  # (S+1,)

    @property
    def n_sequences(self) -> int:
        return len(self._input_ids)

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (T,) int64, label_mask (T,) bool) of one sequence."""
        return self._input_ids[index], self._label_masks[index]


def online_sequences(cfg: Config, tokenizer) -> InMemorySequences:
    """The task's sequences exactly as the cache's sequences stage stores them (same order)."""
    examples = tasks.load_examples(
        cfg.data.task, cfg.data.split, cfg.data.data_files, cfg.data.limit, cfg.data.seed
    )
    tokenized = tasks.tokenize_examples(
        examples, tokenizer, cfg.data.max_length, cfg.data.chat_template
    )
    input_ids, label_masks, _ = labels.order_sequences(tokenized)
    return InMemorySequences(input_ids, label_masks)


@dataclass
class Batch(LabelBatch):
    """One micro-batch of B sequences with N label tokens in total (see `labels.LabelBatch`),
    with where it sits in the stream and what the cache holds for its label rows."""

    position: int = 0
    """Global batch number (epoch * batches_per_epoch + batch within the epoch) on this process."""
    sequences: np.ndarray | None = None
    """(B,) int64 sequence indices in the store."""
    target: SparseTarget | None = None
    """The cached target rows of the N label tokens (None without a target stage)."""
    ref_loss: torch.Tensor | None = None
    """(N,) float32 cached per-token loss of the reference (None unless asked for)."""


def _concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class BatchStream:
    """Seeded micro-batches over a `CacheReader` or `InMemorySequences`, for one process."""

    def __init__(
        self,
        sequences: CacheReader | InMemorySequences,
        batch_size: int,
        seed: int,
        pad_id: int,
        with_target: bool = False,
        ref: tuple[str, str] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        """`with_target` reads the cached target rows, `ref` = (name, divergence) the cached
        reference losses; both need `sequences` to be a CacheReader."""
        if (with_target or ref is not None) and not isinstance(sequences, CacheReader):
            raise ValueError("cached target rows and reference losses need a CacheReader")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.with_target = with_target
        self.ref = ref
        self.rank = rank
        self.world_size = world_size
        self.label_offsets = sequences.label_offsets  # (S+1,) int64
        n_batches = -(-sequences.n_sequences // batch_size)
        self.batches_per_epoch = n_batches // world_size
        """Micro-batches per epoch on each process."""

    def order(self, epoch: int) -> np.ndarray:
        """(S,) int64: the epoch's permutation of sequence indices (the same on every process)."""
        return np.random.default_rng((self.seed, epoch)).permutation(self.sequences.n_sequences)

    def batch_indices(self, position: int, order: np.ndarray | None = None) -> np.ndarray:
        """(B,) int64 sequence indices of this process's global batch `position`."""
        epoch, within = divmod(position, self.batches_per_epoch)
        if order is None:
            order = self.order(epoch)
        start = (within * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]

    def load(self, position: int, indices: np.ndarray) -> Batch:
        """Read and pad the sequences `indices` (and their rows) into one Batch."""
        seqs, masks = zip(*(self.sequences.sequence(int(i)) for i in indices), strict=True)
        input_ids, attention_mask, index_b, index_t = labels.pad_arrays(seqs, masks, self.pad_id)
        batch = Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            index_b=torch.from_numpy(index_b),
            index_t=torch.from_numpy(index_t),
            position=position,
            sequences=np.asarray(indices, dtype=np.int64),
        )
        spans = [(int(self.label_offsets[i]), int(self.label_offsets[i + 1])) for i in indices]
        reader = self.sequences
        if self.with_target:
            assert isinstance(reader, CacheReader)
            rows = _concat_rows([reader.target_rows(a, b) for a, b in spans])
            batch.target = sparse.from_rows(rows)
        if self.ref is not None:
            assert isinstance(reader, CacheReader)
            name, divergence = self.ref
            losses = [reader.ref_losses(name, divergence, a, b) for a, b in spans]
            batch.ref_loss = torch.from_numpy(np.concatenate(losses))
        return batch

    def batches(self, start_batch: int = 0, stop_batch: int | None = None) -> Iterator[Batch]:
        """This process's batches start_batch, start_batch + 1, ... (across epochs), prefetched.

        stop_batch None runs forever. Skipping costs nothing: a batch is read only when reached.
        """
        if self.batches_per_epoch == 0:
            raise ValueError("fewer batches than processes: nothing to iterate")

        def positions() -> Iterator[tuple[int, np.ndarray]]:
            epoch, order = -1, None
            position = start_batch
            while stop_batch is None or position < stop_batch:
                if position // self.batches_per_epoch != epoch:
                    epoch = position // self.batches_per_epoch
                    order = self.order(epoch)
                yield position, self.batch_indices(position, order)
                position += 1

        return prefetch(lambda item: self.load(*item), positions(), PREFETCH)


def prefetch(make: Callable, items: Iterable, depth: int) -> Iterator:
    """make(item) for each item, computed in a background thread up to `depth` items ahead.

    An error in the thread is raised in the consumer; closing the generator stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", make(item))):
                    return
            put(("end", None))
        except BaseException as err:  # handed to the consumer
            put(("error", err))

    def consume() -> Iterator:
        thread = threading.Thread(target=work, daemon=True, name="adaspec-prefetch")
        thread.start()
        try:
            while True:
                kind, value = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            thread.join()

    return consume()
