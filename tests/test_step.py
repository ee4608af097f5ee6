"""The training step: no host sync per micro-batch; one selection function for every rule."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import run_metrics, train_config

from adaspec import selection, step
from adaspec.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

# Every way a tensor's value reaches the host (each is a device sync on a GPU).
SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_syncs():
    """Count host syncs by where they happen: counts["micro"] in our code inside
    Learner.micro_step, ["other"] in our code outside it, ["library"] in a library's code
    (transformers' eager mask preparation checks position ids on the host once per forward;
    `--compile` traces that check away)."""
    counts = {"micro": 0, "other": 0, "library": 0}
    inside = [False]
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}
    ours = str(Path(step.__file__).parent)

    def spy(name):
        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(ours):
                counts["library"] += 1
            else:
                counts["micro" if inside[0] else "other"] += 1
            return originals[name](self, *args, **kwargs)
        return call

    real_micro = step.Learner.micro_step

    def micro(self, *args, **kwargs):
        inside[0] = True
        try:
            return real_micro(self, *args, **kwargs)
        finally:
            inside[0] = False

    with contextlib.ExitStack() as stack:
        for name in SYNCS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, spy(name)))
        stack.enter_context(mock.patch.object(step.Learner, "micro_step", micro))
        yield counts


@pytest.mark.parametrize("values", [
    dict(k=0.5, selection="adaspec"),  # AdaSPEC, the official micro-batch threshold
    dict(k=0.5, selection="speckd"),
    dict(k=1.0),
    dict(stage="sft"),
])
def test_no_host_sync_per_micro_batch(env, tmp_path, values):
    cfg = train_config(env, grad_accum=4, batch_size=1, epochs=1.0, log_every=2, out=tmp_path / "r",
                       **values)
    with counting_syncs() as counts:
        train(cfg, progress=False)
    assert counts["micro"] == 0, counts
    steps = len(run_metrics(tmp_path / "r")) * 2  # 8 micro-batches / 4 = 2 steps, logged once
    assert steps == 2
    # Outside the micro-batches: a few per logged step (the metrics) and per run (saving).
    assert counts["other"] < 200, counts


def test_the_global_threshold_needs_no_sync_either(env, tmp_path):
    cfg = train_config(env, k=0.5, threshold="global", grad_accum=2, batch_size=1, epochs=0.5,
                       out=tmp_path / "g")
    with counting_syncs() as counts:
        train(cfg, progress=False)
    assert counts["micro"] == 0, counts


def test_select_is_one_function_for_every_rule():
    loss = torch.tensor([0.5, 2.0, math.nan, 1.0, 3.0, math.inf])
    ref = torch.tensor([0.4, 0.1, 0.0, 0.9, 0.2, 0.0])
    argmax = torch.tensor([1, 2, 3, 4, 5, 6])
    top1 = torch.tensor([1, 0, 3, 4, 0, 6])
    # k = 1 keeps every finite token whatever the rule.
    for rule in selection.RULES:
        assert selection.select(rule, 1.0, loss, ref, argmax, top1).tolist() == [
            True, True, False, True, True, False]
    # AdaSPEC: the quantile over the 4 finite deltas (0.1, 1.9, 0.1, 2.8) at 1 - k = 0.5.
    kept = selection.select("adaspec", 0.5, loss, ref)
    finite = torch.isfinite(loss)
    delta = (loss - ref)[finite]
    want = torch.zeros(6, dtype=torch.bool)
    want[finite] = delta >= torch.quantile(delta, 0.5)
    assert torch.equal(kept, want) and kept.tolist() == [False, True, False, False, True, False]
    # SpecKD: argmax == top-1, finite losses only.
    assert selection.select("speckd", 0.5, loss, draft_argmax=argmax,
                            target_top1=top1).tolist() == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="ref_loss"):
        selection.select("adaspec", 0.5, loss)
