"""Sequences as batches of label positions, and a model's logits at those positions.

Every phase sees text the same way: sequences stored longest first (`order_sequences`), cut
into batches of a padded-token budget (`plan_batches`), right-padded with the positions of their
label tokens (`pad_batch` -> `LabelBatch`), and a model's logits taken only at label rows, cut to
the vocabulary the tokenizer can produce (`LabelLogits`). The build, training, evaluation and the
benches all use these, so a label row means the same thing everywhere:

    label row r of a batch = the r-th label token in sequence order (sequence 0's first, each
    sequence's in position order), predicted from the hidden state at (index_b[r], index_t[r]),
    one position before the token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adaspec import draft_vocab, models


def order_sequences(tokenized: Sequence) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Longest first (stable), dropping sequences without label tokens at positions >= 1.

    `tokenized` holds objects with input_ids, labels (-100 off the labels) and source_index
    (`tasks.TokenizedExample`). Returns (input_ids (T,) int64, label_mask (T,) bool, source
    index) per kept sequence.
    """
    kept = []
    for ex in tokenized:
        mask = np.asarray(ex.labels) != -100
        mask[:1] = False  # position 0 has no prefix to predict it from
        if mask.any():
            kept.append((np.asarray(ex.input_ids, dtype=np.int64), mask, ex.source_index))
    kept.sort(key=lambda item: -len(item[0]))
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) sequence ranges of at most `batch_tokens` padded tokens.

    `lengths` is sorted longest first, so a batch's first sequence sets its padded length.
    """
    batches, start, n = [], 0, len(lengths)
    while start < n:
        size = max(1, batch_tokens // int(lengths[start]))
        batches.append((start, min(n, start + size)))
        start += size
    return batches


@dataclass
class LabelBatch:
    """B right-padded sequences and the positions of their N label tokens."""

    input_ids: torch.Tensor
    """(B, T) int64, right-padded with the pad id."""
    attention_mask: torch.Tensor
    """(B, T) int64, 1 on real tokens."""
    index_b: torch.Tensor
    """(N,) int64 batch row of each label token."""
    index_t: torch.Tensor
    """(N,) int64 position predicting each label token (the token sits at index_t + 1)."""

    @property
    def n_labels(self) -> int:
        return int(self.index_b.numel())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def label_ids(self) -> torch.Tensor:
        """(N,) int64 the label tokens themselves."""
        return self.input_ids[self.index_b, self.index_t + 1]

    def to(self, device, non_blocking: bool = False) -> LabelBatch:
        """The same batch with its tensors on `device` (non_blocking from pinned memory)."""
        return dataclasses.replace(self, **{
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("input_ids", "attention_mask", "index_b", "index_t")})


def pad_arrays(seqs: Sequence[np.ndarray], masks: Sequence[np.ndarray], pad_id: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad sequences and find their label positions, vectorised (no per-sequence loop
    beyond the concatenation).

    Returns input_ids (B, T) int64, attention_mask (B, T) int64, index_b (N,) and index_t (N,)
    int64 (see `LabelBatch`).
    """
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max())
    real = np.arange(width)[None, :] < lengths[:, None]  # (B, T) bool
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    input_ids[real] = np.concatenate(seqs)
    label = np.zeros((len(seqs), width), dtype=bool)
    label[real] = np.concatenate(masks)
    index_b, index_t = np.nonzero(label)  # row-major: sequence order, then position order
    return input_ids, real.astype(np.int64), index_b, index_t - 1


def pad_batch(seqs: Sequence[np.ndarray], masks: Sequence[np.ndarray], pad_id: int
              ) -> LabelBatch:
    """`pad_arrays` as torch tensors."""
    input_ids, attention_mask, index_b, index_t = pad_arrays(seqs, masks, pad_id)
    return LabelBatch(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                      torch.from_numpy(index_b), torch.from_numpy(index_t))


def forward_inputs(model, batch: LabelBatch) -> dict:
    """The keyword inputs of a causal LM's forward over a right-padded batch.

    No attention mask: with right padding and causal attention a real position only sees
    positions before it, which are real too, so every label row's output is the same with or
    without the mask. Leaving it out lets the model take its plain causal path; with a mask,
    transformers checks on the host whether the mask is all ones (a device sync per forward).
    """
    device = next(model.parameters()).device
    return {"input_ids": batch.input_ids.to(device), "use_cache": False}


def label_hidden(model, batch: LabelBatch) -> torch.Tensor:
    """(N, H) the model's last hidden states at the batch's label rows (models with a plain
    head: `models.has_plain_head`). Runs with gradients if they are enabled."""
    out = model.base_model(**forward_inputs(model, batch))
    device = out.last_hidden_state.device
    return out.last_hidden_state[batch.index_b.to(device), batch.index_t.to(device)]


class LabelLogits:
    """A frozen model's logits at a batch's label rows, computed in row blocks on demand.

    The trunk runs once over the padded batch; only label rows go through the vocabulary head,
    and only `stop - start` of them at a time, so (rows, V) memory stays bounded. Logits are
    float32 and cut to the first `vocab_size` ids (a padded head's extra rows never count).
    """

    @torch.no_grad()
    def __init__(self, model, batch: LabelBatch, vocab_size: int | None = None):
        self.vocab_size = vocab_size
        self.n_rows = batch.n_labels
        if models.has_plain_head(model):
            self._hidden = label_hidden(model, batch)  # (N, H)
            self._head = model.get_output_embeddings()
            self._logits = None
        else:
            out = model(**forward_inputs(model, batch))
            device = out.logits.device
            self._logits = out.logits[batch.index_b.to(device), batch.index_t.to(device)]
            self._head = None

    @torch.no_grad()
    def __call__(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(stop - start, V) float32 logits of label rows [start, stop) (default: all)."""
        stop = self.n_rows if stop is None else stop
        if self._logits is not None:
            logits = self._logits[start:stop]
        else:
            logits = self._head(self._hidden[start:stop])
        logits = logits.float()
        return logits if self.vocab_size is None else models.cut_logits(logits, self.vocab_size)

    @property
    def reduced_head(self):
        """The model's `draft_vocab.ReducedHead`, or None for a full-vocabulary head."""
        return self._head if isinstance(self._head, draft_vocab.ReducedHead) else None

    @torch.no_grad()
    def restricted(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(stop - start, N + 1) float32 logits over a reduced head's map and its rest."""
        stop = self.n_rows if stop is None else stop
        return self.reduced_head.restricted_logits(self._hidden[start:stop]).float()

    def log_softmax(self) -> torch.Tensor:
        """(N, V) float32 log-probs of every label row."""
        return torch.log_softmax(self(), dim=-1)
