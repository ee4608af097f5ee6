"""Validation acceptance while training: equal to adaspec-eval's offline number, best/ kept."""

from __future__ import annotations

import json

import pytest
from helpers import build_split_target, save_tiny_model, train_config

from adaspec.build import build_stage
from adaspec.evaluate import evaluate
from adaspec.train import train
from adaspec.validation import plateau, validation_records

pytestmark = pytest.mark.usefixtures("one_thread")


def test_validation_per_epoch_equals_offline_eval_and_best_is_the_argmax(
        env, validation_cache, tmp_path):
    run_dir = train(train_config(env, k=1.0, epochs=3.0, lr=3e-3, eval_split="validation",
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


def test_keep_best_needs_an_eval_split(env, tmp_path):
    from adaspec.errors import UserError

    with pytest.raises(UserError, match="--keep-best"):
        train_config(env, keep_best=True, out=tmp_path / "x")


@pytest.fixture(scope="module")
def continuations_cache(env, tmp_path_factory):
    """The target's own greedy continuations of 4 validation prompts, in their own cache."""
    return build_split_target(env, "validation", 4, {
        "topk": 64, "generate": True, "gen_temperature": 0.0, "gen_max_new_tokens": 6,
        "cache": str(tmp_path_factory.mktemp("cont") / "cache")})


def test_eval_cache_validates_on_its_split_and_keeps_best_by_greedy_agreement(
        env, continuations_cache, tmp_path):
    run_dir = train(train_config(env, k=1.0, epochs=3.0, lr=3e-3, eval_split="validation",
                                 eval_cache=continuations_cache.cache.cache, keep_best=True,
                                 best_metric="greedy_agreement", eval_every=2,
                                 out=tmp_path / "run"), progress=False)
    records = validation_records(run_dir)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    final = evaluate(continuations_cache, [str(run_dir / "model")], ("offline",),
                     progress=False)[0]["offline"]
    assert records[-1]["greedy_agreement"] == pytest.approx(final["greedy_agreement"])
    assert records[-1]["label_tokens"] == final["label_tokens"]
    best = json.loads((run_dir / "best" / "best.json").read_text())
    agreement = [r["greedy_agreement"] for r in records]
    assert best["metric"] == "greedy_agreement"
    assert best["greedy_agreement"] == max(agreement)
    assert best["step"] == records[agreement.index(max(agreement))]["step"]
    # the run reports its plateau in its metrics (the last quarter of 12 steps: after step 9)
    from adaspec import runs

    reported = [r["plateau"] for r in runs.read_metrics(run_dir) if "plateau" in r]
    assert len(reported) == 1 and reported[0] == plateau(records, "greedy_agreement")


def test_eval_cache_of_another_target_is_refused(env, continuations_cache, tmp_path):
    from adaspec.errors import UserError

    other = tmp_path / "other"
    save_tiny_model(other, env.tok, seed=7)
    cfg = train_config(env, {"cache": str(tmp_path / "c2"), "topk": 64})
    cfg.models.target = str(other)
    cfg.data.split, cfg.data.limit = "validation", 4
    build_stage(cfg, "target", progress=False)
    with pytest.raises(UserError, match="built with the target"):
        train(train_config(env, k=1.0, epochs=1.0, eval_split="validation",
                           eval_cache=str(tmp_path / "c2"), out=tmp_path / "run"), progress=False)


@pytest.mark.parametrize("values,reached,change", [
    # steps 10..40: the last quarter starts after step 30
    ([0.10, 0.20, 0.30, 0.40], False, 0.10),   # still rising
    ([0.10, 0.30, 0.301, 0.303], True, 0.002),  # flat: +0.2 pt over the last quarter
    ([0.10, 0.30, 0.31, 0.25], True, -0.06),   # falling (over-fitting) is not improving
])
def test_plateau_compares_the_last_quarter_with_before(values, reached, change):
    records = [{"step": 10 * (i + 1), "greedy_agreement": v} for i, v in enumerate(values)]
    p = plateau(records, "greedy_agreement")
    assert p["reached"] is reached
    assert p["change"] == pytest.approx(change)
    assert p["since_step"] == 30


def test_plateau_without_evaluations_on_both_sides_is_not_reached():
    assert plateau([], "greedy_agreement")["reached"] is False
    one = plateau([{"step": 5, "greedy_agreement": 0.3}], "greedy_agreement")
    assert one["reached"] is False and one["change"] is None
