"""Prepacked oneDNN linears for CPU decoding: the same function (against a float64 reference),
every plain Linear replaced and nothing else, only where they apply."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_tiny_model

from adaspec import cpu_decoding, draft_vocab, speculative

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="PyTorch built without oneDNN")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_prepacked_model_computes_the_same_logits_as_float64(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=3).eval()
    reference = copy.deepcopy(model).double()
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert cpu_decoding.available(model)
    assert cpu_decoding.prepack_linears(model) == n_linear > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model, ids).double(), _logits(reference, ids),
                               rtol=1e-4, atol=1e-4)


def test_prepacked_models_decode_with_a_kv_cache_like_the_plain_ones(tiny_tokenizer):
    """Cached decoding through the speculative decoder: a step verifying several tokens gives the
    plain model's logits at every position (float tolerance), and greedy speculative decoding
    with a prepacked target and draft keeps the target's greedy output."""
    target = make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=4).eval()
    draft = make_tiny_model(len(tiny_tokenizer), n_layers=1, seed=5).eval()
    plain_target = copy.deepcopy(target)
    cpu_decoding.prepack_linears(target)
    cpu_decoding.prepack_linears(draft)
    prompt = torch.randint(0, len(tiny_tokenizer), (1, 9),
                           generator=torch.Generator().manual_seed(1))
    vocab = len(tiny_tokenizer)
    packed, plain = speculative._new_cache(target), speculative._new_cache(plain_target)
    speculative._forward(target, packed, prompt[0], 1, vocab)
    speculative._forward(plain_target, plain, prompt[0], 1, vocab)
    step = torch.tensor([3, 7, 1, 4, 9])
    torch.testing.assert_close(speculative._forward(target, packed, step, 5, vocab),
                               speculative._forward(plain_target, plain, step, 5, vocab),
                               rtol=1e-4, atol=1e-4)
    expected = speculative.target_generate(target, prompt, 12, vocab_size=vocab)
    got, stats = speculative.speculative_generate(target, draft, prompt, 12, gamma=4,
                                                  vocab_size=vocab)
    assert torch.equal(got, expected) and stats.steps >= 1


def test_reduced_head_is_kept_and_non_fp32_models_are_left_alone(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), n_layers=1, seed=6).eval()
    draft_vocab.reduce_head(model, torch.arange(0, len(tiny_tokenizer), 2))
    head = model.get_output_embeddings()
    cpu_decoding.prepack_linears(model)
    assert model.get_output_embeddings() is head  # not an nn.Linear: its own forward
    assert not cpu_decoding.available(make_tiny_model(len(tiny_tokenizer)).to(torch.bfloat16))
