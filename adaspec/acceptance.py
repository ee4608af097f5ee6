"""Acceptance-rate math for speculative decoding, pure torch.

Under rejection sampling (Leviathan et al. 2023) a draft token x ~ q is accepted against the target
p with probability min(1, p(x) / q(x)), so the chance that one draft token is accepted is
sum_x min(p(x), q(x)) = 1 - TVD(p, q). These functions compute it per position from full
distributions, bound it from a sparse (top-K + tail) target cache, and give the greedy analogue.
Letters: N positions, V vocabulary, K cached target entries per position.
"""

from __future__ import annotations

import torch


def _check_same_shape(target: torch.Tensor, draft: torch.Tensor, what: str) -> None:
    if target.shape != draft.shape:
        raise ValueError(
            f"target_{what} has shape {tuple(target.shape)} but draft_{what} has shape "
            f"{tuple(draft.shape)}; cut both to the shared vocabulary first"
        )


def expected_acceptance(
    target_logprobs: torch.Tensor, draft_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-position probability that a draft token sampled from q is accepted against p.

    Args:
        target_logprobs: (N, V) log p, any float dtype.
        draft_logprobs: (N, V) log q over the same vocabulary.

    Returns:
        (N,) float32 sum_x min(p(x), q(x)) = 1 - TVD(p, q), in [0, 1].
    """
    _check_same_shape(target_logprobs, draft_logprobs, "logprobs")
    # min in log space then exp: no cancellation, unlike 1 - 0.5 * |p - q|.sum()
    both = torch.minimum(target_logprobs.float(), draft_logprobs.float())
    return both.exp().sum(dim=-1)


def greedy_agreement(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Whether the draft's greedy token equals the target's: the greedy acceptance event.

    Args:
        target_logits: (N, V) target logits (or log-probs: argmax is the same).
        draft_logits: (N, V) draft logits over the same vocabulary.

    Returns:
        (N,) bool, True where argmax agrees (ties go to the lowest id, as in `torch.argmax`).
    """
    _check_same_shape(target_logits, draft_logits, "logits")
    return target_logits.argmax(dim=-1) == draft_logits.argmax(dim=-1)


def sparse_acceptance_bounds(
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_tail_logmass: torch.Tensor,
    draft_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on sum_x min(p, q) when only the target's top-K entries and tail mass are known.

    The K cached tokens give sum_k min(p_k, q_k) exactly; the tail tokens add something in
    [0, min(p_tail, q_tail)], because a sum of minima is at most the minimum of the sums.
    The same holds for any set of known entries, e.g. the distinct tokens of a sampled cache:
    a slot whose log-prob is -inf is empty (its id is ignored).

    Args:
        target_ids: (N, K) integer token ids of the cached target entries, distinct per row
            among the non-empty slots.
        target_logprobs: (N, K) target log-probs of those ids; -inf marks an empty slot.
        target_tail_logmass: (N,) log of the target mass outside the known ids (-inf when they
            cover the vocabulary).
        draft_logprobs: (N, V) full draft log-probs.

    Returns:
        (lower, upper), each (N,) float32 with lower <= sum_x min(p, q) <= upper; both equal
        the exact value when K = V.
    """
    if target_ids.shape != target_logprobs.shape:
        raise ValueError(
            f"target_ids has shape {tuple(target_ids.shape)} but target_logprobs has shape "
            f"{tuple(target_logprobs.shape)}; they must both be (N, K)"
        )
    target_probs = target_logprobs.float().exp()  # (N, K)
    draft_probs = draft_logprobs.float().gather(-1, target_ids.long()).exp()  # (N, K)
    draft_probs = torch.where(target_logprobs == float("-inf"), 0.0, draft_probs)  # empty slots
    lower = torch.minimum(target_probs, draft_probs).sum(dim=-1)
    target_tail = target_tail_logmass.float().exp()
    # q's mass outside the K ids; clamp the rounding error that can make it slightly negative
    draft_tail = (1.0 - draft_probs.sum(dim=-1)).clamp(min=0.0)
    upper = lower + torch.minimum(target_tail, draft_tail)
    return lower, upper
