"""Validation acceptance while training: equal to adaspec-eval's offline number, best/ kept."""

from __future__ import annotations

import json
import random

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
    # steps 10..80: the quarter before is steps 41-60, the last quarter 61-80
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], False, 0.20),          # still rising
    ([0.1, 0.3, 0.5, 0.6, 0.60, 0.602, 0.601, 0.604], True, 0.0015),  # flat
    ([0.1, 0.3, 0.5, 0.6, 0.62, 0.60, 0.58, 0.55], True, -0.045),     # falling (over-fitting)
])
def test_plateau_compares_the_means_of_the_last_two_quarters(values, reached, change):
    records = [{"step": 10 * (i + 1), "greedy_agreement": v} for i, v in enumerate(values)]
    p = plateau(records, "greedy_agreement")
    assert p["reached"] is reached
    assert p["change"] == pytest.approx(change)
    assert p["since_step"] == 60 and p["previous_from_step"] == 40
    assert p["evaluations"] == [2, 2]


def test_plateau_is_not_fooled_by_one_high_evaluation():
    """One lucky evaluation decided the maximum-based rule: a rising curve whose best point came
    before the last quarter looked flat, and a flat one with a late spike looked rising. The
    means see through both."""
    rng = random.Random(0)
    steps = [10 * (i + 1) for i in range(40)]  # quarter before: 210-300, last quarter: 310-400

    rising = [0.5 + 0.004 * i + rng.gauss(0, 0.01) for i in range(40)]
    rising[25] = 0.80  # step 260
    records = [{"step": s, "greedy_agreement": v} for s, v in zip(steps, rising, strict=True)]
    assert max(v for s, v in zip(steps, rising, strict=True) if s > 300) < 0.80  # old rule: flat
    p = plateau(records, "greedy_agreement")
    assert p["reached"] is False and p["change"] > 0.01

    flat = [0.7 + rng.gauss(0, 0.003) for _ in range(40)]
    flat[-1] = 0.73  # step 400, 3 pt above the rest: the old rule: "rising"
    records = [{"step": s, "greedy_agreement": v} for s, v in zip(steps, flat, strict=True)]
    p = plateau(records, "greedy_agreement")
    previous = [v for s, v in zip(steps, flat, strict=True) if 200 < s <= 300]
    last = [v for s, v in zip(steps, flat, strict=True) if s > 300]
    assert p["means"] == pytest.approx([sum(previous) / 10, sum(last) / 10])
    assert p["reached"] is True and abs(p["change"]) < 0.005


def test_plateau_without_evaluations_on_both_sides_is_not_reached():
    assert plateau([], "greedy_agreement")["reached"] is False
    one = plateau([{"step": 5, "greedy_agreement": 0.3}], "greedy_agreement")
    assert one["reached"] is False and one["change"] is None
    early = [{"step": s, "greedy_agreement": 0.3} for s in (1, 2, 40)]  # none in steps 21-30
    assert plateau(early, "greedy_agreement")["change"] is None
