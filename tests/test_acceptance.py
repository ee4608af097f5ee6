"""Acceptance-rate math against plain references, and against measured speculative acceptance."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model

from adaspec.acceptance import expected_acceptance, greedy_agreement, sparse_acceptance_bounds
from adaspec.speculative import SpecStats, speculative_generate


def _random_logprobs(n: int, v: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    return torch.log_softmax(scale * torch.randn(n, v, generator=gen, dtype=torch.float64), dim=-1)


def test_expected_acceptance_is_one_minus_tvd():
    gen = torch.Generator().manual_seed(0)
    target, draft = _random_logprobs(64, 50, 3.0, gen), _random_logprobs(64, 50, 3.0, gen)
    got = expected_acceptance(target, draft)
    reference = 1 - 0.5 * (target.exp() - draft.exp()).abs().sum(dim=-1)
    assert got.dtype == torch.float32 and got.shape == (64,)
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=1e-6)
    # identical distributions always accept; disjoint supports never do
    torch.testing.assert_close(expected_acceptance(target, target), torch.ones(64))
    disjoint = torch.tensor([[0.0, -torch.inf], [-torch.inf, 0.0]])
    assert expected_acceptance(disjoint, disjoint.flip(-1)).tolist() == [0.0, 0.0]


def test_expected_acceptance_low_precision_inputs_give_fp32():
    gen = torch.Generator().manual_seed(1)
    target, draft = _random_logprobs(8, 20, 2.0, gen), _random_logprobs(8, 20, 2.0, gen)
    got = expected_acceptance(target.bfloat16(), draft.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected_acceptance(target, draft), rtol=0, atol=0.03)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        expected_acceptance(torch.zeros(2, 5), torch.zeros(2, 6))


def test_greedy_agreement_hand_made():
    target = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    draft = torch.tensor([[0.0, 9.0, 0.0], [0.0, 1.0, 3.0], [-1.0, -2.0, 0.5], [2.0, 2.0, 0.0]])
    assert greedy_agreement(target, draft).tolist() == [True, False, True, True]


def _top_k(target: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache row: the K largest log-probs, their ids and the log of the remaining mass."""
    logprobs, ids = target.topk(k, dim=-1)  # (N, K)
    tail = torch.log1p(-logprobs.exp().sum(dim=-1).clamp(max=1.0))  # (N,)
    return ids, logprobs, tail


@pytest.mark.parametrize("k", [1, 4, 16, 39])
def test_sparse_bounds_contain_exact_value(k):
    gen = torch.Generator().manual_seed(k)
    target, draft = _random_logprobs(256, 40, 2.0, gen), _random_logprobs(256, 40, 2.0, gen)
    exact = expected_acceptance(target, draft)
    lower, upper = sparse_acceptance_bounds(*_top_k(target, k), draft)
    assert lower.dtype == upper.dtype == torch.float32 and lower.shape == (256,)
    assert (lower <= exact + 1e-6).all() and (exact <= upper + 1e-6).all()
    assert (upper - lower).max() > 0  # the tail leaves a real gap below K = V


def test_sparse_bounds_ignore_empty_slots():
    """A sampled cache pads rows with empty slots (log-prob -inf, id 0): they change nothing."""
    gen = torch.Generator().manual_seed(5)
    target, draft = _random_logprobs(64, 40, 2.0, gen), _random_logprobs(64, 40, 2.0, gen)
    ids, logprobs, tail = _top_k(target, 6)
    pad_ids = torch.cat([ids, torch.zeros(64, 3, dtype=ids.dtype)], dim=1)
    pad_lp = torch.cat([logprobs, torch.full((64, 3), -torch.inf)], dim=1)
    expected = sparse_acceptance_bounds(ids, logprobs, tail, draft)
    for got, want in zip(sparse_acceptance_bounds(pad_ids, pad_lp, tail, draft), expected,
                         strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_sparse_bounds_exact_at_full_vocab():
    gen = torch.Generator().manual_seed(2)
    target, draft = _random_logprobs(32, 12, 2.0, gen), _random_logprobs(32, 12, 2.0, gen)
    exact = expected_acceptance(target, draft)
    ids, logprobs, _ = _top_k(target, 12)
    lower, upper = sparse_acceptance_bounds(ids, logprobs, torch.full((32,), -torch.inf), draft)
    torch.testing.assert_close(lower, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(upper, exact, rtol=0, atol=1e-6)


def test_measured_acceptance_matches_expected_acceptance():
    """With gamma = 1 and 2 new tokens, each run drafts exactly one token after the prompt, so
    the measured acceptance over runs estimates sum_x min(p, q) at the prompt's last position."""
    torch.manual_seed(0)
    target = make_tiny_model(8, n_layers=2, seed=0)
    draft = make_tiny_model(8, n_layers=1, seed=3)
    with torch.no_grad():  # random tiny models are near uniform; sharpen them so q differs from p
        target.lm_head.weight.mul_(10.0)
        draft.lm_head.weight.mul_(10.0)
    prompts, runs = [[1, 2, 3], [4, 4], [7, 0, 5, 6]], 300
    gen = torch.Generator().manual_seed(0)
    measured, expected = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt])
            total = SpecStats()
            for _ in range(runs):
                _, stats = speculative_generate(target, draft, ids, 2, 1, 1.0, generator=gen)
                total = total.merge(stats)
            assert total.drafted == runs
            measured.append(total.draft_acceptance_rate())
            with torch.no_grad():
                target_logprobs = target(input_ids=ids).logits[:, -1].log_softmax(-1)  # (1, V)
                draft_logprobs = draft(input_ids=ids).logits[:, -1].log_softmax(-1)  # (1, V)
            expected.append(float(expected_acceptance(target_logprobs, draft_logprobs)))
    finally:
        torch.set_num_threads(threads)
    assert 0.2 < sum(expected) / 3 < 0.8  # both outcomes are common, so the check has power
    # binomial std of the mean over 900 runs is <= 0.017
    assert abs(sum(measured) / 3 - sum(expected) / 3) < 0.06
