"""Speculative decoding: greedy output equals the target's, sampling follows the target's law."""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch
from helpers import (
    SMALL_VOCAB,
    SpeculativeSampler,
    chi2_pvalue,
    first_two_token_counts,
    first_two_token_probs,
    make_tiny_model,
    sharpen_lm_head,
)
from transformers.generation.candidate_generator import AssistedCandidateGenerator

from adaspec.speculative import SpecStats, speculative_generate, target_generate

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
PROMPTS = [[1, 2, 3], [5, 9, 11, 40, 7], [63, 17]]


@pytest.fixture(scope="module")
def target():
    return make_tiny_model(VOCAB, n_layers=2, seed=0)


@pytest.fixture(scope="module")
def drafts(target):
    """A draft from another seed (never agrees) and a noisy copy of the target (sometimes does)."""
    noisy = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        weight = noisy.lm_head.weight
        weight.add_(0.02 * torch.randn(weight.shape, generator=gen))
    return {"other": make_tiny_model(VOCAB, n_layers=1, seed=1), "noisy": noisy}


def _hf_greedy(model, ids, max_new_tokens, eos_token_id, **kwargs) -> list[int]:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        **kwargs,
    )
    return out[0, ids.shape[1] :].tolist()


def _check_stats(stats: SpecStats, out: torch.Tensor, gamma: int, max_new_tokens: int) -> None:
    assert out.dtype == torch.int64 and out.dim() == 1
    assert stats.new_tokens == len(out) <= max_new_tokens
    assert stats.accepted + stats.rejected <= stats.drafted <= gamma * stats.steps
    assert stats.rejected <= stats.steps
    # every step emits its accepted drafts plus one target token (or stops at a drafted EOS)
    assert stats.new_tokens in (stats.accepted + stats.steps, stats.accepted + stats.steps - 1)
    if stats.steps:
        assert 1.0 <= stats.mean_accepted_length() <= gamma + 1


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("draft_name", ["other", "noisy"])
def test_greedy_equals_target_greedy(target, drafts, draft_name, gamma):
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        expected = target_generate(target, ids, 17, eos_token_id=0)
        assert expected.tolist() == _hf_greedy(target, ids, 17, eos_token_id=0)
        out, stats = speculative_generate(
            target, drafts[draft_name], ids, 17, gamma, eos_token_id=0
        )
        assert out.tolist() == expected.tolist()
        _check_stats(stats, out, gamma, 17)
        if 0 not in out.tolist():
            assert len(out) == 17  # max_new_tokens is hit exactly


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_stops_at_eos(target, drafts, gamma):
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        free = target_generate(target, ids, 16).tolist()
        # the latest first-occurrence in the free run, so EOS lands mid-sequence
        eos = max(free[1:], key=free.index)
        cut = free.index(eos) + 1
        assert cut > 1
        for draft in (*drafts.values(), target):
            out, stats = speculative_generate(target, draft, ids, 16, gamma, eos_token_id=eos)
            assert out.tolist() == free[:cut]
            _check_stats(stats, out, gamma, 16)
        assert _hf_greedy(target, ids, 16, eos_token_id=eos) == free[:cut]


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 4, 6, 7])
def test_max_new_tokens_is_exact(target, drafts, max_new_tokens):
    ids = torch.tensor([PROMPTS[1]])
    expected = target_generate(target, ids, max_new_tokens)
    assert len(expected) == max_new_tokens
    for draft in (*drafts.values(), target):
        out, stats = speculative_generate(target, draft, ids, max_new_tokens, gamma=3)
        assert out.tolist() == expected.tolist()
        _check_stats(stats, out, 3, max_new_tokens)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_identical_draft_accepts_everything_greedy(target, gamma):
    out, stats = speculative_generate(target, target, torch.tensor([PROMPTS[0]]), 20, gamma)
    assert len(out) == 20
    assert stats.accepted == stats.drafted and stats.rejected == 0
    assert stats.alpha() == stats.draft_acceptance_rate() == 1.0
    # every step but possibly the last drafts gamma and emits gamma + 1
    assert stats.steps == math.ceil(20 / (gamma + 1))


def test_padded_draft_vocab(target, drafts):
    """A draft with extra padding rows is cut to the shared vocabulary."""
    padded = make_tiny_model(VOCAB + 8, n_layers=1, seed=1)
    with torch.no_grad():
        padded.lm_head.weight[VOCAB:] = 10.0  # padding rows would win every argmax if not cut
    ids = torch.tensor([PROMPTS[0]])
    out, stats = speculative_generate(target, padded, ids, 12, gamma=3, vocab_size=VOCAB)
    assert out.tolist() == target_generate(target, ids, 12).tolist()
    assert max(out.tolist()) < VOCAB


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_matches_transformers_assisted_generation(target, drafts, gamma, monkeypatch):
    """`target.generate(assistant_model=draft)` gives the same tokens and the same counts.

    transformers 5 does not report acceptance counts from `generate`; the per-step number of
    candidates and matches is passed to `AssistedCandidateGenerator.update_candidate_strategy`,
    so the test spies on that method. The assistant's schedule is made constant (no heuristic
    growth of `num_assistant_tokens`, no confidence early stop) so both draft `gamma` per step.
    transformers counts a drafted EOS as its bonus token, so counts are compared on runs
    that do not reach EOS.
    """
    steps: list[tuple[int, int]] = []
    original = AssistedCandidateGenerator.update_candidate_strategy

    def spy(self, input_ids, scores, num_matches):
        steps.append((scores.shape[1] - 1, int(num_matches)))
        return original(self, input_ids, scores, num_matches)

    monkeypatch.setattr(AssistedCandidateGenerator, "update_candidate_strategy", spy)
    for draft in drafts.values():
        assistant = copy.deepcopy(draft)
        assistant.generation_config.num_assistant_tokens = gamma
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            steps.clear()
            hf = _hf_greedy(target, ids, 15, eos_token_id=0, assistant_model=assistant)
            out, stats = speculative_generate(target, draft, ids, 15, gamma, eos_token_id=0)
            assert out.tolist() == hf
            if 0 not in hf:
                hf_stats = SpecStats(
                    steps=len(steps),
                    drafted=sum(c for c, _ in steps),
                    accepted=sum(m for _, m in steps),
                    rejected=sum(m < c for c, m in steps),
                    new_tokens=len(hf),
                    # per position (non-increasing: the zeros are the positions never reached)
                    accepted_at=[n for i in range(gamma) if (n := sum(m > i for _, m in steps))],
                    drafted_at=[n for i in range(gamma) if (n := sum(c > i for c, _ in steps))],
                )
                assert stats == hf_stats


# --- sampling ---------------------------------------------------------------------------------


def test_sampling_follows_target_distribution():
    target = sharpen_lm_head(make_tiny_model(SMALL_VOCAB, n_layers=2, seed=0), 10.0)
    draft = sharpen_lm_head(make_tiny_model(SMALL_VOCAB, n_layers=1, seed=3), 10.0)
    prompt, temperature, runs = [1, 2, 3], 0.8, 1000
    ids = torch.tensor([prompt])
    probs = first_two_token_probs(target, prompt, temperature)
    assert probs.max() < 0.5  # the law is spread out enough for the test to have power

    gen = torch.Generator().manual_seed(0)
    spec = SpeculativeSampler(target, draft, ids, temperature, gen)
    assert chi2_pvalue(first_two_token_counts(spec, runs), probs) > 1e-3
    assert 0.1 < spec.stats.alpha() < 0.9  # both accepting and rejecting paths were exercised
    base = first_two_token_counts(
        lambda: target_generate(target, ids, 2, temperature, generator=gen), 500)
    assert chi2_pvalue(base, probs) > 1e-3
    # the test can fail: a different law is rejected
    wrong = first_two_token_probs(draft, prompt, temperature)
    assert chi2_pvalue(first_two_token_counts(spec, 300), wrong) < 1e-3


def test_sampling_identical_draft_accepts_everything():
    target = sharpen_lm_head(make_tiny_model(SMALL_VOCAB, n_layers=2, seed=0), 10.0)
    gen = torch.Generator().manual_seed(0)
    total = SpecStats()
    for prompt in PROMPTS:
        ids = torch.tensor([[t % SMALL_VOCAB for t in prompt]])
        out, stats = speculative_generate(target, target, ids, 24, 3, 1.0, generator=gen)
        _check_stats(stats, out, 3, 24)
        total = total.merge(stats)
    assert total.alpha() == 1.0 and total.rejected == 0


def test_spec_stats_ratios_and_merge():
    a = SpecStats(steps=2, drafted=6, accepted=3, rejected=2, new_tokens=5)
    b = SpecStats(steps=1, drafted=3, accepted=3, rejected=0, new_tokens=4)
    m = a.merge(b)
    assert m == SpecStats(steps=3, drafted=9, accepted=6, rejected=2, new_tokens=9)
    assert m.alpha() == 6 / 8
    assert m.draft_acceptance_rate() == 6 / 9
    assert m.mean_accepted_length() == 1 + 6 / 3
    assert math.isnan(SpecStats().alpha())


def test_bad_arguments_name_the_value(target):
    with pytest.raises(ValueError, match="gamma=0"):
        speculative_generate(target, target, torch.tensor([[1]]), 4, gamma=0)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        target_generate(target, torch.ones(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="temperature=-1"):
        target_generate(target, torch.tensor([[1]]), 4, temperature=-1)


# --- transformers API -------------------------------------------------------------------------


def test_decoding_uses_no_deprecated_transformers_api(target, drafts):
    """transformers 5.2x warns that `past_key_values` goes in 5.40; the decoding must not."""
    ids = torch.tensor([PROMPTS[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = speculative_generate(target, drafts["noisy"], ids, 6, gamma=3, eos_token_id=0)
        assert out.tolist() == target_generate(target, ids, 6, eos_token_id=0).tolist()


class _OldCacheApi(torch.nn.Module):
    """A causal LM whose forward takes `past_key_values` (transformers <= 5.17's name)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        params = inspect.signature(type(inner).forward).parameters
        self._name = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0):
        return self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                          **{self._name: past_key_values})


def test_models_with_the_old_cache_argument_still_decode(target, drafts):
    """The argument's name follows each model's signature: an old-style forward gets its cache
    (without it, each step would see one token and the output would differ)."""
    ids = torch.tensor([PROMPTS[1]])
    old_target, old_draft = _OldCacheApi(target), _OldCacheApi(drafts["noisy"])
    expected = target_generate(target, ids, 9)
    assert target_generate(old_target, ids, 9).tolist() == expected.tolist()
    out, stats = speculative_generate(old_target, old_draft, ids, 9, gamma=3)
    assert out.tolist() == expected.tolist()
    _check_stats(stats, out, 3, 9)
