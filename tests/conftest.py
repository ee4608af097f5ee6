"""Shared fixtures: a seed, one thread, a tiny tokenizer and target, the task files, and `env`
(a tiny cache with a trained reference) with its validation cache.

Tiny models keep the suite fast; a few tests marked `slow` use the embedded default model. The
plain helpers these fixtures use, and the test modules share, are in helpers.py.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import (
    SHARED_DATA,
    build_split_target,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_model,
    sharpen_lm_head,
    train_config,
)


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
    return save_tiny_model(tmp_path_factory.mktemp("tiny_target"), tiny_tokenizer, seed=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real task files beside the repo; a missing folder fails loudly, never skips."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"{SHARED_DATA} is missing: tests need ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A K = V cache of 8 gsm8k rows with a trained, recorded and built reference.

    Its target's lm_head is scaled up so its distributions are peaked (per-token KL of order
    0.1 instead of 1e-4 for a near-uniform random model), which makes loss comparisons
    meaningful. `helpers.train_config(env, ...)` gives the settings of a run on it.
    """
    from adaspec.build import build_stage
    from adaspec.train import train

    root = tmp_path_factory.mktemp("train")
    tok = make_tiny_tokenizer()
    target_dir = root / "target"
    model = sharpen_lm_head(make_tiny_model(len(tok), n_layers=2, seed=1), 30.0)
    model.save_pretrained(target_dir)
    tok.save_pretrained(target_dir)
    env = SimpleNamespace(root=root, tok=tok, target=target_dir, cache=root / "cache")
    build_stage(train_config(env), "target", progress=False)
    # The reference stage records itself; `adaspec-cache build --model ref` then finds it.
    env.ref_run = train(train_config(env, stage="ref", epochs=2, lr=1e-3, out=root / "ref"),
                        progress=False)
    env.manifest = build_stage(train_config(env), "ref", progress=False)
    return env


@pytest.fixture(scope="module")
def validation_cache(env):
    """env's target on 6 validation rows (top-64), built into env's cache; returns its settings."""
    return build_split_target(env, "validation", 6, {"topk": 64})


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
