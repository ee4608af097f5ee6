"""Sweeps on tiny models: table and plots written, re-run is a no-op, single pass == one by one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from helpers import build_split_target, run_weights, train_config

from adaspec import draft_vocab, runs, train
from adaspec.build import build_stage
from adaspec.sweep import Variant, grid, run_sweep, train_single_pass, variant_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(env):
    """conftest's env plus the evaluation cache: the target on 4 rows of the test split."""
    build_split_target(env, "test", 4)
    return env


def test_sweep_writes_table_plots_and_reruns_as_a_no_op(env, tmp_path):
    cfg = train_config(env, epochs=1.0)
    variants = grid([0.5, 1.0], [1.0], ["fkl"], [0])
    rows = run_sweep(cfg, variants, tmp_path / "s", "test", progress=False)
    assert [r["k"] for r in rows] == [0.5, 1.0]
    for r in rows:
        assert 0.0 <= r["alpha_lower"] <= r["alpha_upper"] <= 1.0
        assert r["eval_tokens"] > 0
    for name in ("results.csv", "results.md", "alpha_vs_k.png", "loss_curves.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0
    assert "k0.5-e1-fkl-s0" in (tmp_path / "s" / "results.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("model.safetensors")}
    again = run_sweep(cfg, variants, tmp_path / "s", "test", progress=False)
    assert again == rows
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained


def test_single_pass_equals_one_by_one(env, tmp_path):
    cfg = train_config(env, epochs=1.0)
    variants = grid([0.5, 1.0], [1.0, 2.0], ["fkl"], [0])
    one = run_sweep(cfg, variants, tmp_path / "one", "test", progress=False)
    many = run_sweep(cfg, variants, tmp_path / "many", "test", single_pass=True, progress=False)
    for a, b in zip(one, many, strict=True):
        wa = run_weights(tmp_path / "one" / a["name"])
        wb = run_weights(tmp_path / "many" / b["name"])
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
        assert a["alpha_lower"] == pytest.approx(b["alpha_lower"], abs=1e-5)


def test_single_pass_reduces_the_vocabulary_as_training_does(env, tmp_path):
    """`train.draft_vocab` in a sweep: the single pass trained full-vocabulary heads without a
    word (it copied training's setup and missed `reduce_vocabulary`); its runs now equal the
    one-by-one runs, reduced head and token map included."""
    cfg = train_config(env, epochs=1.0, draft_vocab=16)
    variants = grid([1.0], [1.0, 2.0], ["fkl"], [0])  # k < 1 needs a reference of the same map
    one = run_sweep(cfg, variants, tmp_path / "one", "test", progress=False)
    many = run_sweep(cfg, variants, tmp_path / "many", "test", single_pass=True, progress=False)
    for a, b in zip(one, many, strict=True):
        folder_a, folder_b = (tmp_path / "one" / a["name"]), (tmp_path / "many" / b["name"])
        map_a = (folder_a / "model" / draft_vocab.MAP_FILE).read_text()
        assert map_a == (folder_b / "model" / draft_vocab.MAP_FILE).read_text()
        wa, wb = run_weights(folder_a), run_weights(folder_b)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
        assert a["alpha_lower"] == pytest.approx(b["alpha_lower"], abs=1e-5)


# Every training setting that changes the model or the data, with the variant it needs: a
# setting that matters only below k = 1 (official schedule, selection rule) runs at k = 0.5.
SETTINGS = {
    "draft_vocab": ({"draft_vocab": 16}, Variant(1.0, 1.0, "fkl", 0)),
    "compile": ({"compile": True}, Variant(1.0, 1.0, "fkl", 0)),
    "official_schedule": ({"official_schedule": True}, Variant(0.5, 1.0, "fkl", 0)),
    "selection": ({"selection": "speckd"}, Variant(0.5, 1.0, "fkl", 0)),
    "loss": ({}, Variant(1.0, 1.0, "rkl", 1)),
    "online": ({"online": True}, Variant(1.0, 1.0, "fkl", 0)),
}


def _saved_config(run_dir) -> dict:
    saved = yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text())
    saved.pop(runs.RUN_KEY)  # the run's id: new for every run
    saved["train"].pop("out")
    return saved


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_single_pass_trains_every_setting_as_train_does(env, tmp_path, setting):
    """`train` and the sweep's single pass share one setup (`train.open_inputs`): a setting
    that changes the model or the data ends in the same run folder through both (weights,
    config with schedule and reference, token map, loss curve)."""
    values, variant = SETTINGS[setting]
    cfg = train_config(env, epochs=1.0, **values)
    one = tmp_path / "one"
    train.train(variant_config(cfg, variant, one), progress=False)
    train_single_pass(cfg, [variant], tmp_path / "many", progress=False)
    many = tmp_path / "many" / variant.name
    assert _saved_config(one) == _saved_config(many)
    wa, wb = run_weights(one), run_weights(many)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
    maps = [folder / "model" / draft_vocab.MAP_FILE for folder in (one, many)]
    assert [m.is_file() for m in maps] == [setting == "draft_vocab"] * 2
    if setting == "draft_vocab":
        assert maps[0].read_text() == maps[1].read_text()
    losses = [[r["loss"] for r in runs.training_metrics(f)] for f in (one, many)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    assert len(losses[0]) == runs.read_schedule(one)["optimizer_steps"]


def test_best_epoch_column_single_pass_and_the_html_report(env, tmp_path):
    """Variants keep their best epoch on a selection split (one by one and in a single pass,
    alike); report.html holds the table, the plots inline, the cache's settings and links."""
    cfg = train_config(env, epochs=1.0, lr=3e-3)
    val = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="validation",
                                                            limit=4))
    build_stage(val, "target", progress=False)
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep,
                                                             select_split="validation"))
    variants = grid([0.5, 1.0], [2.0], ["fkl"], [0])
    one = run_sweep(cfg, variants, tmp_path / "one", "test", progress=False)
    many = run_sweep(cfg, variants, tmp_path / "many", "test", single_pass=True,
                     progress=False)
    for a, b in zip(one, many, strict=True):
        assert a["best_epoch"] in (1.0, 2.0) and a["best_epoch"] == b["best_epoch"]
        assert a["best_alpha_mid"] == pytest.approx(b["best_alpha_mid"], abs=1e-5)
    assert "best epoch" in (tmp_path / "one" / "results.md").read_text()
    page = (tmp_path / "one" / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 2
    for a in one:
        assert a["name"] in page and f'href="{a["name"]}/metrics.jsonl"' in page
    assert "value_encoding" in page and "best-epoch acceptance" in page
    from html.parser import HTMLParser

    HTMLParser().feed(page)  # parses


def test_an_interrupted_sweep_resumes_by_the_runs_rules(env, tmp_path, capsys):
    """A variant killed mid-training resumes from its checkpoint (no --resume flag exists), one
    killed before its first checkpoint starts over, one killed while being evaluated is only
    evaluated; a folder that is not a sweep is refused untouched."""
    from adaspec import runs
    from adaspec.errors import UserError
    from adaspec.sweep import variant_config
    from adaspec.train import train

    cfg = train_config(env, epochs=1.0, checkpoint_every=2)
    variants = grid([0.5, 1.0], [1.0], ["fkl"], [0])
    whole = run_sweep(cfg, variants, tmp_path / "whole", "test", progress=False)
    out = tmp_path / "cut"
    run_sweep(cfg, variants[:0], out, "test", progress=False)  # an empty sweep folder
    a, b = variants
    train(variant_config(cfg, a, out / a.name), progress=False, max_steps=2)  # mid-training
    (out / b.name).mkdir()
    (out / b.name / "config.yaml").write_text("models: {}\n")  # killed before a checkpoint
    rows = run_sweep(cfg, variants, out, "test", progress=False)
    for done, again in zip(whole, rows, strict=True):
        assert again["alpha_lower"] == pytest.approx(done["alpha_lower"], abs=1e-6)
        wa, wb = run_weights(tmp_path / "whole" / done["name"]), run_weights(out / again["name"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    (out / a.name / "result.json").unlink()  # killed while evaluating: evaluated again only
    stamp = (runs.model_dir(out / a.name) / "model.safetensors").stat().st_mtime_ns
    run_sweep(cfg, variants, out, "test", progress=False)
    assert (runs.model_dir(out / a.name) / "model.safetensors").stat().st_mtime_ns == stamp
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a sweep folder"):
        run_sweep(cfg, variants, foreign, "test", progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
