"""--report-to tensorboard: event files tensorboard's reader parses, with the logged scalars."""

from __future__ import annotations

import pytest
from helpers import run_metrics, train_config

from adaspec.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensorboard_events_hold_the_metrics_and_the_config(env, validation_cache,
                                                            tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(train_config(env, k=1.0, epochs=2.0, lr=3e-3, report_to="tensorboard",
                                 eval_split="validation", out=tmp_path / "run"), progress=False)
    events = sorted((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert events, list((run_dir / "logs").rglob("*"))
    scalars: dict[str, list] = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    train_lines = [m for m in run_metrics(run_dir) if "loss" in m]  # not validation, plateau
    loss = sorted(scalars["train/loss"], key=lambda e: e.step)
    assert [e.step for e in loss] == [m["step"] for m in train_lines]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in train_lines], rel=1e-6)
    for tag in ("train/selected_fraction", "train/lr", "train/tokens_per_s"):
        assert len(scalars[tag]) == len(train_lines), tag
    validation = [m["validation"] for m in run_metrics(run_dir) if "validation" in m]
    got = sorted(scalars["validation/expected_acceptance"], key=lambda e: e.step)
    assert [e.value for e in got] == pytest.approx(
        [v["expected_acceptance"] for v in validation], rel=1e-6)
    # The run's config as hyperparameters (accelerate writes them beside the events).
    hparams = list((run_dir / "logs").rglob("hparams.yml"))
    assert hparams and "train/k: 1.0" in hparams[0].read_text()


def test_a_tracker_without_its_package_is_refused_in_one_line(monkeypatch, capsys):
    """accelerate only warns and logs nothing when a tracker's package is missing."""
    import importlib.util

    from adaspec.cli.common import run
    from adaspec.cli.train import main as train_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        run(train_main, ["--report-to", "tensorboard", "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs the tensorboard package" in err
