"""Shared fixtures: a seed, a tiny byte-level BPE tokenizer and tiny random causal LMs.

Tiny models keep the suite fast; a few tests marked `slow` use the embedded default model.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The final answer is: 72",
    "Give three tips for staying healthy. Eat a balanced diet and get enough sleep.",
    "Write a python function to find the first repeated character in a given string.",
    "def first_repeated_char(str1):\n    for index, c in enumerate(str1):\n        return c",
    "Summarize the following article. The prison link project helps people in Wales.",
]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (so it encodes any text) with about `vocab_size` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_tiny_model(vocab_size: int, n_layers: int = 2, seed: int = 0, hidden: int = 32):
    """A randomly initialised Llama-architecture causal LM, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same seed."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny matmuls on a shared 2-core machine run ~30x slower with two
    threads spinning against other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A save_pretrained folder holding a tiny random target and the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny_target")
    make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real task files beside the repo; a missing folder fails loudly, never skips."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"{SHARED_DATA} is missing: tests need ../shared/data")
    return SHARED_DATA


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
