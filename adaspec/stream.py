"""Batches for torch: sequences, their cached target rows and reference losses, in a seeded order.

Order. Each epoch is a permutation of the sequence indices drawn from
`np.random.default_rng((seed, epoch))`, cut into micro-batches of `batch_size` sequences (the
last one may be short). Under several processes, process r takes batches r, r + world,
r + 2 world, ... and the ragged tail that would give some processes one batch more than others is
dropped, so every process does the same number of steps. Batches are numbered globally across
epochs (batch b is batch b % per_epoch of epoch b // per_epoch), so a resumed run restarts at the
exact batch it stopped at with `start_batch`.

Memory. The stream holds the stored rows it serves in memory, as stored (after the chunks'
decompression), and assembles and decodes each batch with a few numpy gathers: that is
what keeps up with a GPU (a per-sequence zarr read per array costs ~0.2 ms each). When the
split's rows and tokens fit `memory_budget_mb` (the usual case: the default cache takes 12-17 B
per label token, ~17 MB per million), the whole split is held and the order is a plain
permutation of all sequences. When they do not, sequences are grouped into consecutive blocks
of about budget / 8 bytes, at most 8 blocks are held (least recently used ones are dropped), and
the epoch's order is a *windowed* shuffle, as MosaicML Streaming and WebDataset do: the blocks
are permuted, taken 6 at a time, and the sequences of each window are permuted among
themselves. Memory is then bounded by the budget, not by the data; the order is just as seeded
and resumable, but it is another order than the whole-split one for the same seed.

Reading happens in a background thread that keeps up to `PREFETCH` batches ready (in pinned
memory when CUDA is there, so host->device copies can be asynchronous).

Online runs read the same sequences built in memory (`online_sequences`, the cache's own
tokenize-and-order code), so cached and online runs see identical batches.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from adaspec import labels, sparse, tasks
from adaspec.config import Config
from adaspec.labels import LabelBatch
from adaspec.sparse import SparseTarget
from cache_tools import schema
from cache_tools.store import CacheReader

PREFETCH = 4  # batches read ahead of the training step
DEFAULT_BUDGET_MB = 2048
BLOCKS_HELD = 8  # blocks of sequences in memory when the split does not fit the budget
WINDOW_BLOCKS = BLOCKS_HELD - 2  # blocks whose sequences are shuffled together


class InMemorySequences:
    """Sequences held in memory, with the `CacheReader` interface the stream reads through."""

    def __init__(self, input_ids: list[np.ndarray], label_masks: list[np.ndarray]):
        lengths = [len(x) for x in input_ids]
        n_labels = [int(np.count_nonzero(m)) for m in label_masks]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (S+1,)
        self.label_offsets = np.concatenate([[0], np.cumsum(n_labels)]).astype(np.int64)
        self._ids = (np.concatenate(input_ids) if input_ids else np.zeros(0, np.int64))
        self._mask = (np.concatenate(label_masks) if label_masks else np.zeros(0, bool))

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (T,) int64, label_mask (T,) bool) of one sequence."""
        return self.token_rows(int(self.offsets[index]), int(self.offsets[index + 1]))

    def token_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self._ids[start:stop], self._mask[start:stop]


def online_sequences(cfg: Config, tokenizer) -> InMemorySequences:
    """The task's sequences exactly as the cache's sequences stage stores them (same order)."""
    input_ids, label_masks, _ = labels.order_sequences(tasks.tokenize_split(cfg.data, tokenizer))
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
    token_count: int = 0
    """Real (unpadded) tokens, counted on the host when the batch was made."""

    @property
    def n_tokens(self) -> int:
        return self.token_count


# ---------------------------------------------------------------------------------------------
# Blocks of sequences and the rows held for them


def _libc():
    """glibc, or None (another libc: its defaults stand)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _keep_large_arrays_returnable() -> None:
    """Make glibc give every array of 256 KiB or more its own mapping, returned on free.

    glibc's default threshold adapts upwards as large arrays are freed, after which a dropped
    block's arrays stay in the heap (and in the resident set): a stream that cycles through
    more blocks than it holds would then grow with the data instead of staying within its
    budget. Set once, for the process, when a stream runs in blocks."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS after blocks are dropped (glibc only)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass
class _Block:
    """The tokens and stored rows of sequences [first, stop), decoded for gathering."""

    first: int
    token_start: int
    row_start: int
    ids: np.ndarray  # (T,) token ids
    mask: np.ndarray  # (T,) bool
    rows: dict[str, np.ndarray]  # name -> (R, ...) target arrays and ref losses


class _Blocks:
    """A split cut into blocks of consecutive sequences, held in memory up to a byte budget."""

    def __init__(self, sequences, target: bool, ref: tuple[str, str] | None, budget: int):
        self.sequences = sequences
        self.target, self.ref = target, ref
        offsets, label_offsets = sequences.offsets, sequences.label_offsets
        n_seq = len(offsets) - 1
        row_bytes = self._row_bytes()
        token_bytes = 9  # stored id (<= 8 B once widened) + mask
        total = int(label_offsets[-1]) * row_bytes + int(offsets[-1]) * token_bytes
        if total <= budget:
            starts = np.array([0, n_seq], dtype=np.int64)
        else:
            # Greedy cuts every ~budget / BLOCKS_HELD bytes (a sequence never straddles blocks).
            cost = label_offsets[1:] * row_bytes + offsets[1:] * token_bytes  # (S,) cumulative
            step = budget // BLOCKS_HELD
            cut = np.unique(np.searchsorted(cost, np.arange(step, int(cost[-1]), step)) + 1)
            starts = np.unique(np.concatenate([[0], cut[cut < n_seq], [n_seq]]))
        self.starts = starts  # (n_blocks + 1,) first sequence of each block, then S
        self.whole = len(starts) == 2 and total <= budget
        if not self.whole:
            _keep_large_arrays_returnable()
        self.block_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))  # (S,)
        self.held: OrderedDict[int, _Block] = OrderedDict()

    @property
    def n_blocks(self) -> int:
        return len(self.starts) - 1

    def _row_bytes(self) -> int:
        """Bytes a held label row takes: target arrays as stored (ids widened to 2-4 B), and
        a float32 reference loss."""
        total = 0
        if self.target:
            total += self.sequences.target_row_bytes
        if self.ref is not None:
            total += 4
        return max(total, 1)

    def get(self, b: int) -> _Block:
        """Block b, read and decoded if it is not held (dropping the least recently used)."""
        if b in self.held:
            self.held.move_to_end(b)
            return self.held[b]
        if len(self.held) >= BLOCKS_HELD:
            while len(self.held) >= BLOCKS_HELD:
                self.held.popitem(last=False)
            _release_freed_memory()
        self.held[b] = block = self._read(b)
        return block

    def _read(self, b: int) -> _Block:
        s0, s1 = int(self.starts[b]), int(self.starts[b + 1])
        seqs = self.sequences
        t0, t1 = int(seqs.offsets[s0]), int(seqs.offsets[s1])
        r0, r1 = int(seqs.label_offsets[s0]), int(seqs.label_offsets[s1])
        ids, mask = seqs.token_rows(t0, t1)
        rows: dict[str, np.ndarray] = {}
        if self.target:  # held as stored; a batch decodes its own rows (a few thousand)
            rows.update(seqs.stored_rows(schema.TARGET, r0, r1))
        if self.ref is not None:
            name, divergence = self.ref
            rows["ref_loss"] = seqs.ref_losses(name, divergence, r0, r1)
        return _Block(s0, t0, r0, np.asarray(ids), np.asarray(mask, dtype=bool), rows)


# ---------------------------------------------------------------------------------------------
# The stream


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
        memory_budget_mb: float = DEFAULT_BUDGET_MB,
    ):
        """`with_target` reads the cached target rows, `ref` = (name, divergence) the cached
        reference losses; both need `sequences` to be a CacheReader. `memory_budget_mb` bounds
        the rows and tokens held (see the module docstring)."""
        if (with_target or ref is not None) and not isinstance(sequences, CacheReader):
            raise ValueError("cached target rows and reference losses need a CacheReader")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if ref is not None:
            sequences.ref_stage(ref[0])  # a one-line CacheError now rather than mid-epoch
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.with_target = with_target
        self.ref = ref
        self.rank = rank
        self.world_size = world_size
        self.label_offsets = sequences.label_offsets  # (S+1,) int64
        self.blocks = _Blocks(sequences, with_target, ref, int(memory_budget_mb * 2**20))
        self._pin = torch.cuda.is_available()
        n_batches = -(-sequences.n_sequences // batch_size)
        self.batches_per_epoch = n_batches // world_size
        """Micro-batches per epoch on each process."""

    def order(self, epoch: int) -> np.ndarray:
        """(S,) int64: the epoch's order of sequence indices (the same on every process)."""
        rng = np.random.default_rng((self.seed, epoch))
        if self.blocks.whole:
            return rng.permutation(self.sequences.n_sequences)
        starts = self.blocks.starts
        shuffled = rng.permutation(self.blocks.n_blocks)
        parts = []
        for w in range(0, len(shuffled), WINDOW_BLOCKS):
            window = np.concatenate([np.arange(starts[b], starts[b + 1])
                                     for b in shuffled[w : w + WINDOW_BLOCKS]])
            parts.append(rng.permutation(window))
        return np.concatenate(parts)

    def batch_indices(self, position: int, order: np.ndarray | None = None) -> np.ndarray:
        """(B,) int64 sequence indices of this process's global batch `position`."""
        epoch, within = divmod(position, self.batches_per_epoch)
        if order is None:
            order = self.order(epoch)
        start = (within * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]

    def load(self, position: int, indices: np.ndarray) -> Batch:
        """Gather and pad the sequences `indices` (and their rows) into one Batch."""
        seqs = self.sequences
        ids, masks, parts = [], [], {}
        for s in np.asarray(indices, dtype=np.int64).tolist():
            block = self.blocks.get(int(self.blocks.block_of[s]))
            t0 = int(seqs.offsets[s]) - block.token_start
            t1 = int(seqs.offsets[s + 1]) - block.token_start
            ids.append(block.ids[t0:t1])
            masks.append(block.mask[t0:t1])
            r0 = int(seqs.label_offsets[s]) - block.row_start
            r1 = int(seqs.label_offsets[s + 1]) - block.row_start
            for name, values in block.rows.items():
                parts.setdefault(name, []).append(values[r0:r1])
        input_ids, attention_mask, index_b, index_t = labels.pad_arrays(ids, masks, self.pad_id)
        batch = Batch(
            input_ids=self._tensor(input_ids), attention_mask=self._tensor(attention_mask),
            index_b=self._tensor(index_b), index_t=self._tensor(index_t),
            position=position, sequences=np.asarray(indices, dtype=np.int64),
            token_count=int(sum(len(x) for x in ids)),
        )
        rows = {name: np.concatenate(p) for name, p in parts.items()}
        if self.with_target:
            target = seqs.decode_target({name: rows[name] for name in rows if name != "ref_loss"})
            batch.target = sparse.from_rows({k: self._tensor(v) for k, v in target.items()})
        if self.ref is not None:
            batch.ref_loss = self._tensor(rows["ref_loss"])
        return batch

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        return tensor.pin_memory() if self._pin else tensor

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
