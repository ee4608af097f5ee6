"""The shard loop of a cache build, shared by both row stages: a fixed plan of batches over a
split's label rows (`BatchLayout`) and `run_shards`, which computes each pending shard's rows
batch by batch and hands them to the stage writer, writing one shard while the next is computed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from adaspec.labels import plan_batches
from cache_tools.store import StageWriter


@dataclass
class BatchLayout:
    """Where each sequence's label rows and each batch's sequences sit."""

    offsets_labels: np.ndarray  # (S+1,) label row offsets
    batches: list[tuple[int, int]]
    batch_of_seq: np.ndarray  # (S,) batch index of each sequence

    @classmethod
    def from_sequences(cls, label_offsets: np.ndarray, lengths: np.ndarray, batch_tokens: int):
        batches = plan_batches(lengths, batch_tokens)
        batch_of_seq = np.zeros(len(lengths), dtype=np.int64)
        for i, (a, b) in enumerate(batches):
            batch_of_seq[a:b] = i
        return cls(label_offsets, batches, batch_of_seq)

    def batches_for_rows(self, start: int, stop: int) -> list[int]:
        first = int(np.searchsorted(self.offsets_labels, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets_labels, stop, side="left"))  # exclusive
        return sorted(set(self.batch_of_seq[first:last].tolist()))

    def batch_rows(self, batch: int) -> tuple[int, int]:
        a, b = self.batches[batch]
        return int(self.offsets_labels[a]), int(self.offsets_labels[b])


def run_shards(
    writer: StageWriter,
    layout: BatchLayout,
    shards: list[int],
    compute_batch: Callable[[int], tuple[dict[str, np.ndarray], int]],
    desc: str,
    disable_bar: bool,
    before_write: Callable[[], None] = lambda: None,
) -> None:
    """Compute and write each shard; writing overlaps the next shard's compute.

    compute_batch(b) -> (rows of batch b as numpy arrays, tokens run through the model).
    """
    total = sum(writer.shard_range(s)[1] - writer.shard_range(s)[0] for s in shards)
    bar = tqdm(total=total, desc=desc, unit="row", disable=disable_bar, dynamic_ncols=True)
    writes: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def writer_loop() -> None:
        while (item := writes.get()) is not None:
            try:
                writer.write_shard(*item)
            except BaseException as err:  # surfaced in the main thread below
                failure.append(err)

    thread = threading.Thread(target=writer_loop, daemon=True)
    thread.start()
    memo: tuple[int, dict] | None = None  # a batch straddling two shards is computed once
    tokens, started = 0, time.perf_counter()
    try:
        for shard in shards:
            start, stop = writer.shard_range(shard)
            parts: dict[str, list[np.ndarray]] = {}
            for batch in layout.batches_for_rows(start, stop):
                if memo is not None and memo[0] == batch:
                    rows = memo[1]
                else:
                    rows, batch_tokens = compute_batch(batch)
                    tokens += batch_tokens
                    memo = (batch, rows)
                b_start, b_stop = layout.batch_rows(batch)
                lo, hi = max(start, b_start) - b_start, min(stop, b_stop) - b_start
                for name, values in rows.items():
                    parts.setdefault(name, []).append(values[lo:hi])
                bar.update(hi - lo)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            if failure:
                raise failure[0]
            before_write()  # e.g. the build lease still held
            writes.put((shard, {name: np.concatenate(p) for name, p in parts.items()}))
    finally:
        writes.put(None)
        thread.join()
        bar.close()
    if failure:
        raise failure[0]
