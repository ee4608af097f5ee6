"""Validation acceptance while training: equal to adaspec-eval's offline number, best/ kept."""

from __future__ import annotations

import json

import pytest
from test_train import _cfg, env  # noqa: F401 - env is a fixture

from adaspec.build import build_stage
from adaspec.evaluate import evaluate
from adaspec.train import train
from adaspec.validation import validation_records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def validation_cache(env):  # noqa: F811
    cfg = _cfg(env, {"topk": 64})
    cfg.data.split, cfg.data.limit = "validation", 6
    build_stage(cfg, "target", progress=False)
    return cfg


def test_validation_per_epoch_equals_offline_eval_and_best_is_the_argmax(
        env, validation_cache, tmp_path):  # noqa: F811
    run_dir = train(_cfg(env, k=1.0, epochs=3.0, lr=3e-3, eval_split="validation",
                         keep_best=True, out=tmp_path / "run"), progress=False)
    records = validation_records(run_dir)
    assert [r["epoch"] for r in records] == [1.0, 2.0, 3.0]
    assert [r["step"] for r in records] == [4, 8, 12]
    final = evaluate(validation_cache, [str(run_dir / "model")], ("offline",),
                     progress=False)[0]["offline"]
    assert records[-1]["expected_acceptance_lower"] == pytest.approx(
        final["expected_acceptance_lower"], abs=1e-6)
    assert records[-1]["expected_acceptance_upper"] == pytest.approx(
        final["expected_acceptance_upper"], abs=1e-6)
    assert records[-1]["greedy_agreement"] == pytest.approx(final["greedy_agreement"])
    best = json.loads((run_dir / "best" / "best.json").read_text())
    scores = [r["expected_acceptance"] for r in records]
    assert best["step"] == records[scores.index(max(scores))]["step"]
    kept = evaluate(validation_cache, [str(run_dir / "best")], ("offline",),
                    progress=False)[0]["offline"]
    assert (kept["expected_acceptance_lower"] + kept["expected_acceptance_upper"]) / 2 == \
        pytest.approx(max(scores), abs=1e-6)
    assert len(set(scores)) > 1  # the draft changed between epochs


def test_keep_best_needs_an_eval_split(env, tmp_path):  # noqa: F811
    from adaspec.errors import UserError

    with pytest.raises(UserError, match="--keep-best"):
        _cfg(env, keep_best=True, out=tmp_path / "x")
