"""The sparse target: the cached entries of the target's distribution at N label tokens.

Pure torch. A row is either the top-K log-probs plus the log of the mass outside them ("topk"),
or the distinct ids of S draws from the target with their counts and true log-probs ("sample",
Anshumann et al. 2025). This module makes such rows from logits (`topk_rows`, `sample_rows`),
turns decoded cache rows into a `SparseTarget`, and answers what the training step and the
acceptance measures ask of one: its valid rows, its top-1, its known entries, a one-hot target.
The divergences against it live in `losses`.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class SparseTarget:
    """One batch of cached target entries for N label tokens; exactly one mode is set.

    Fields:
        ids: (N, K) int64 token ids (int32 is accepted and widened). Unique within a row, except
            sample-mode padding (id 0 with count 0).
        logprobs: (N, K) float target log-probs of those ids, true (not renormalised).
        tail_logmass: (N,) float, topk mode: log(1 - sum_k p_k), -inf when K = V. None in sample
            mode.
        counts: (N, K) float or int, sample mode: how many of the S draws gave each id (0 for
            padding). None in topk mode.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.tail_logmass is None) == (self.counts is None):
            raise ValueError(
                "SparseTarget needs exactly one of tail_logmass (topk mode) or counts "
                "(sample mode)"
            )
        if self.ids.dim() != 2 or self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"SparseTarget ids {tuple(self.ids.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must both be (N, K)"
            )
        if self.tail_logmass is not None and self.tail_logmass.shape != self.ids.shape[:1]:
            raise ValueError(
                f"SparseTarget tail_logmass {tuple(self.tail_logmass.shape)} must be (N,) with "
                f"N = {self.ids.shape[0]}"
            )
        if self.counts is not None and self.counts.shape != self.ids.shape:
            raise ValueError(
                f"SparseTarget counts {tuple(self.counts.shape)} must match ids "
                f"{tuple(self.ids.shape)}"
            )

    @property
    def mode(self) -> str:
        """The cache mode: "topk" or "sample"."""
        return "topk" if self.tail_logmass is not None else "sample"

    def __len__(self) -> int:
        return self.ids.shape[0]

    def entry_logprobs(self) -> torch.Tensor:
        """(N, K) log-probs with -inf in empty slots (sample-mode padding, count 0), so that an
        argmax or a sum over entries sees only real tokens."""
        if self.counts is None:
            return self.logprobs
        return torch.where(self.counts > 0, self.logprobs, float("-inf"))

    def valid_rows(self) -> torch.Tensor:
        """(N,) bool: rows whose values hold no NaN or +inf (-inf is a legitimate log-prob)."""
        def ok(x: torch.Tensor) -> torch.Tensor:
            return ~(torch.isnan(x) | (x == math.inf))

        valid = ok(self.logprobs).all(-1)
        if self.tail_logmass is not None:
            valid &= ok(self.tail_logmass)
        if self.counts is not None:
            valid &= ok(self.counts.float()).all(-1)
        return valid

    def emptied(self, rows: torch.Tensor) -> "SparseTarget":
        """A copy where the (N,) bool `rows` have no atoms: their divergence is exactly 0, with
        zero gradient (every atom has weight 0), so a broken row can never reach the draft."""
        keep = ~rows[:, None]  # (N, 1)
        if self.counts is not None:
            return SparseTarget(self.ids, torch.where(keep, self.logprobs, 0.0),
                                counts=torch.where(keep, self.counts, 0))
        return SparseTarget(self.ids, torch.where(keep, self.logprobs, -math.inf),
                            tail_logmass=torch.where(rows, -math.inf, self.tail_logmass))

    def rows(self, start: int, stop: int) -> "SparseTarget":
        """The entries of label tokens start..stop-1 (views, no copy)."""
        return SparseTarget(
            ids=self.ids[start:stop],
            logprobs=self.logprobs[start:stop],
            tail_logmass=None if self.tail_logmass is None else self.tail_logmass[start:stop],
            counts=None if self.counts is None else self.counts[start:stop],
        )

    def to(self, device, non_blocking: bool = False) -> "SparseTarget":
        """The same rows on `device` (non_blocking from pinned memory)."""
        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return SparseTarget(move(self.ids), move(self.logprobs), move(self.tail_logmass),
                            move(self.counts))


def from_rows(rows: dict) -> SparseTarget:
    """Decoded cache rows (`CacheReader.target_rows`: numpy or torch) -> a SparseTarget."""
    tail, counts = rows.get("tail_logmass"), rows.get("counts")
    return SparseTarget(
        ids=torch.as_tensor(rows["ids"]),
        logprobs=torch.as_tensor(rows["logprobs"]),
        tail_logmass=None if tail is None else torch.as_tensor(tail),
        counts=None if counts is None else torch.as_tensor(counts),
    )


def one_hot(label_ids: torch.Tensor) -> SparseTarget:
    """(N,) int64 labels as a SparseTarget of one atom with p = 1: forward KL is then CE."""
    n = label_ids.shape[0]
    return SparseTarget(
        ids=label_ids.view(n, 1),
        logprobs=torch.zeros((n, 1), device=label_ids.device),
        tail_logmass=torch.full((n,), -math.inf, device=label_ids.device),
    )


def top1(target: SparseTarget) -> torch.Tensor:
    """(N,) int64 the target's most likely token: the known entry with the largest log-prob
    (never an empty slot of a sampled row)."""
    best = target.entry_logprobs().argmax(-1, keepdim=True)  # (N, 1)
    return target.ids.long().gather(1, best).squeeze(1)


def known_entries(target: SparseTarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (N, K), log-probs (N, K) float32 with -inf for empty slots, log tail mass (N,)).

    topk rows are returned as stored. In a sampled row the known entries are the distinct
    sampled ids and the tail is the target mass outside them.
    """
    logprobs = target.entry_logprobs().float()
    if target.tail_logmass is not None:
        return target.ids, logprobs, target.tail_logmass.float()
    rest = (1.0 - logprobs.double().exp().sum(-1)).clamp(min=0.0)
    return target.ids, logprobs, rest.log().float()


def first_nonfinite_row(logits: torch.Tensor) -> int | None:
    """The first row of (n, V) logits whose log-softmax is undefined, or None.

    A row is sound when its largest logit is finite: -inf entries (masked ids) are then fine, but
    NaN anywhere (the max propagates it), +inf, or nothing but -inf leave no distribution.
    """
    bad = ~torch.isfinite(logits.amax(dim=-1))
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def topk_rows(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """(n, V) logits -> ids (n, K) int64, logprobs (n, K) float32, tail_logmass (n,) float32.

    Log-probs come from the full-vocabulary log-softmax in float32; the tail is the log of the
    mass outside the top K, computed by logsumexp over the rest (no 1 - sum cancellation).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1)  # sorted, largest first
    rest = logprobs.scatter(1, ids, float("-inf"))
    return {"ids": ids, "logprobs": values, "tail_logmass": torch.logsumexp(rest, dim=-1)}


def sample_rows(logits: torch.Tensor, n_samples: int, generator: torch.Generator) -> dict:
    """(n, V) logits -> `n_samples` draws with replacement per row, as unique ids with counts.

    Returns ids (n, S) int64, logprobs (n, S) float32 (true target log-probs of those ids) and
    counts (n, S) float32; unused slots have id 0, log-prob 0 and count 0.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    draws = torch.multinomial(logprobs.exp(), n_samples, replacement=True, generator=generator)
    draws, _ = torch.sort(draws, dim=-1)  # (n, S)
    is_new = torch.ones_like(draws, dtype=torch.bool)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = torch.cumsum(is_new.long(), dim=-1) - 1  # (n, S) slot of each draw's unique id
    counts = torch.zeros(draws.shape, dtype=torch.float32, device=draws.device).scatter_add_(
        1, slot, torch.ones_like(draws, dtype=torch.float32)
    )
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    values = torch.where(counts > 0, logprobs.gather(1, ids), torch.zeros_like(counts))
    return {"ids": ids, "logprobs": values, "counts": counts}


class NonFiniteRow(Exception):
    """Row `row` of a block of logits has no finite distribution (NaN, +inf or all -inf)."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


def cache_rows(logits: torch.Tensor, mode: str, k: int, generator: torch.Generator
               ) -> dict[str, torch.Tensor]:
    """(n, V) float32 logits (cut to the vocabulary) -> the rows a cache of `mode` stores, on
    the logits' device (the generator must be on it too).

    Raises NonFiniteRow for the first row with no finite distribution: stored encodings would
    turn its NaN log-probs into p = 1.
    """
    bad = first_nonfinite_row(logits)
    if bad is not None:
        raise NonFiniteRow(bad)
    return topk_rows(logits, k) if mode == "topk" else sample_rows(logits, k, generator)
