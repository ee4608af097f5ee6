"""Training that stays correct on a GPU's precision and honest under faults.

fp32 master weights under bf16, stale reference losses, data flags that disagree with the cache,
corrupt chunks and non-finite losses (tiny models, CPU).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from helpers import GSM8K, REPO, corrupt_chunks, run_metrics, run_weights, train_config
from safetensors.torch import load_file

from adaspec import models
from adaspec.cli.cache import main as cache_main
from adaspec.cli.common import run
from adaspec.errors import UserError
from adaspec.step import mixed_precision
from adaspec.train import train
from cache_tools import store
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest
from cache_tools.verify import verify_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def _moved_fraction(run_dir, init_spec: str) -> tuple[float, dict]:
    """Fraction of the saved weights' elements that differ from the initialisation."""
    init, _ = models.load_model(init_spec, dtype=torch.float32)
    start = {name: p.detach() for name, p in init.state_dict().items()}
    saved = run_weights(run_dir)
    moved = total = 0
    for name, value in saved.items():
        moved += int((value.float() != start[name].float()).sum())
        total += value.numel()
    return moved / total, saved


@pytest.mark.parametrize("values", [
    {"models": {"dtype": "bfloat16"}},  # what `auto` does on CUDA for frozen models
    {"train": {"mixed_precision": "bf16"}},
])
def test_bf16_training_moves_every_weight_like_fp32(env, tmp_path, values):
    """AdamW on bf16 weights drops updates smaller than bf16's spacing; fp32 masters keep them."""
    cfg = train_config(env, k=1.0, lr=1e-5, epochs=1.0, out=tmp_path / "run")  # 4 steps
    for section, changes in values.items():
        for key, value in changes.items():
            setattr(getattr(cfg, section), key, value)
    assert mixed_precision(cfg.train.mixed_precision, cfg.models.dtype) == "bf16"
    run_dir = train(cfg, progress=False)
    assert len(run_metrics(run_dir)) == 4
    fraction, saved = _moved_fraction(run_dir, f"{env.target}@layers=1")
    assert fraction >= 0.99
    assert {v.dtype for v in saved.values()} == {torch.float32}  # model/ holds the fp32 masters
    norms = [name for name in saved if "norm" in name]
    assert norms and all(
        not torch.equal(saved[n], torch.ones_like(saved[n])) for n in norms
    )  # RMSNorm gains (initialised to 1) moved too


def test_mixed_precision_policy():
    assert mixed_precision("auto", "float32") == "no"  # CPU here
    assert mixed_precision("auto", "bfloat16") == "bf16"
    assert mixed_precision("no", "bfloat16") == "no"
    with pytest.raises(UserError, match="fp16 needs a CUDA"):
        mixed_precision("fp16", "auto")


def _copy_cache(env, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    return cache


def test_stale_reference_losses_are_refused(env, tmp_path):
    cache = _copy_cache(env, tmp_path)
    values = {"cache": str(cache)}
    # Retrain the reference: the manifest now records ref2, the stored losses are ref1's.
    ref2 = train(train_config(env, values, stage="ref", epochs=1, lr=3e-3, out=tmp_path / "ref2"),
                 progress=False)
    with pytest.raises(UserError) as err:
        train(train_config(env, values, k=0.5, out=tmp_path / "d1"), progress=False)
    message = str(err.value)
    assert "\n" not in message and "adaspec-cache build --model ref" in message
    assert "--rebuild" in message and str(ref2 / "model") in message
    # An explicit --ref is no longer ignored: ref2's weights are not what the stage scored.
    with pytest.raises(UserError, match="were built from"):
        train(train_config(env, values, ref=str(ref2 / "model"), k=0.5, out=tmp_path / "d2"),
              progress=False)
    # ... while the reference that was scored passes the check (its losses are current).
    assert not (tmp_path / "d3").exists()
    train(train_config(env, values, ref=str(env.ref_run / "model"), k=0.5, epochs=0.25,
                       out=tmp_path / "d3"), progress=False)
    # The command the message names rebuilds the losses from ref2; the draft then trains.
    command = re.search(r"`adaspec-cache build (.*?)`", message).group(1).split()
    assert command[:2] == ["--model", "ref"]
    cache_main(["build", *command, "--no-progress"])
    built = Manifest.read(store.open_root(str(cache), "r")["gsm8k/train"])
    assert built.stage("ref/ref").params["model"]["path"] == str((ref2 / "model").resolve())
    assert built.is_complete("ref/ref")
    train(train_config(env, values, k=0.5, epochs=0.25, out=tmp_path / "d4"), progress=False)


def test_draft_must_start_where_the_reference_started(env, tmp_path):
    cfg = train_config(env, k=0.5, out=tmp_path / "d")
    cfg.models.draft = f"{env.target}@layers=2"  # the reference was trained from layers=1
    with pytest.raises(UserError, match="trained from .*@layers=1 but this draft starts from"):
        train(cfg, progress=False)


@pytest.mark.parametrize("data, flag", [
    ({"limit": 4}, "--limit"),
    ({"max_length": 256}, "--max-length"),
    ({"data_files": str(REPO / "README.md")}, "--data-files"),
])
def test_data_flags_that_disagree_with_the_cache_are_refused(env, tmp_path, data, flag):
    cfg = train_config(env, k=1.0, out=tmp_path / "r")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    with pytest.raises(UserError) as err:
        train(cfg, progress=False)
    assert flag in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()


def test_unset_data_flags_mean_as_cached(env, tmp_path):
    """A config that names no data flags trains on the cache as built."""
    from adaspec.config import build_config

    cfg = build_config({
        "models": {"target": str(env.target), "draft": f"{env.target}@layers=1"},
        "data": {"task": "gsm8k"},
        "cache": {"cache": str(env.cache)},
        "train": {"k": 1.0, "batch_size": 2, "epochs": 0.25, "out": str(tmp_path / "r")},
    })
    assert cfg.data.limit is None and "data.limit" not in cfg.explicit
    train(cfg, progress=False)
    assert len(run_metrics(tmp_path / "r")) == 1


def test_corrupt_chunk_is_one_line_and_resume_works_after_repair(env, tmp_path, capsys):
    cache = _copy_cache(env, tmp_path)
    good = tmp_path / "good"
    shutil.copytree(cache, good)
    def cfg(cache_dir, out):
        return train_config(env, {"cache": str(cache_dir)}, k=0.5, batch_size=1, epochs=1, lr=1e-3,
                            checkpoint_every=2, out=out)

    whole = train(cfg(good, tmp_path / "whole"), progress=False)
    # Two good checkpoints, then the store breaks under the run.
    train(cfg(cache, tmp_path / "run"), progress=False, max_steps=4)
    corrupt_chunks(cache, "logprobs")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # as the CLI reports it
        run(lambda argv: train(cfg(cache, tmp_path / "run"), resume=True, progress=False), [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert re.search(r"target/logprobs chunk \d+ \(rows \d+-\d+\)", err)
    assert "adaspec-cache verify" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000004"]
    # The stage is rebuilt (deterministic: the same bytes), and the run resumes to the end.
    cache_main(["build", "--model", "target", "--rebuild", "--cache", str(cache), "--task",
                "gsm8k", "--data-files", str(GSM8K), "--limit", "8", "--target",
                str(env.target), "--topk", str(len(env.tok)), "--sparse", "topk",
                "--value-encoding", "float16", "--shard-rows", "256", "--chunk-rows", "128",
                "--batch-tokens", "1024", "--no-progress"])
    assert verify_cache(str(cache)).ok
    train(cfg(cache, tmp_path / "run"), resume=True, progress=False)
    a, b = run_weights(whole), run_weights(tmp_path / "run")
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


def test_non_finite_losses_are_counted_and_never_learned(env, tmp_path, monkeypatch):
    """A NaN target log-prob reaching a batch gives a NaN loss: counted, never learned. The cache
    itself refuses NaN values since issue 33 (the reader's value checks), so the NaN is put in
    where the stream decodes a batch: every label row whose first cached id is 0 mod 7."""
    from cache_tools.store import CacheReader

    cache = _copy_cache(env, tmp_path)
    reader = CacheReader(str(cache), "gsm8k", "train")
    poisoned = int((reader.target_rows(0, reader.n_label_rows)["ids"][:, 0] % 7 == 0).sum())
    assert poisoned > 0
    decode = CacheReader.decode_target

    def poisoning(self, stored):
        rows = decode(self, stored)
        logprobs = rows["logprobs"].copy()
        logprobs[rows["ids"][:, 0] % 7 == 0, 0] = np.nan
        return {**rows, "logprobs": logprobs}

    monkeypatch.setattr(CacheReader, "decode_target", poisoning)
    for k in (1.0, 0.5):
        run_dir = train(train_config(env, {"cache": str(cache)}, k=k, epochs=1, lr=1e-3,
                                     out=tmp_path / f"k{k}"), progress=False)
        metrics = run_metrics(run_dir)
        assert sum(m["nonfinite_tokens"] for m in metrics) == poisoned
        assert all(np.isfinite(m["loss"]) and m["selected_fraction"] > 0 for m in metrics)
        weights = load_file(run_dir / "model" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_corrupt_chunk_names_the_array_on_read(env, tmp_path):
    from cache_tools.store import CacheReader

    cache = _copy_cache(env, tmp_path)
    corrupt_chunks(cache, "ids", only_first=True)
    reader = CacheReader(str(cache), "gsm8k", "train")
    # The shard file fails its digest, so none of its rows is read; the damaged chunk is named.
    for rows in ((130, 140), (100, 200)):
        with pytest.raises(CacheError, match=r"target/ids chunk 0 \(rows 0-128\)"):
            reader.target_rows(*rows)


# --- issue 20: the three ways a wrong result used to exit 0 --------------------------------------


def _cli_error(capsys, call) -> str:
    """Run `call` as a CLI does; assert exit 2 with one line on stderr; return the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(lambda argv: call(), [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("array", ["target/logprobs", "ref/ref/loss_fkl",
                                   "sequences/input_ids"])
def test_a_missing_chunk_file_is_damage_not_zeros(env, tmp_path, capsys, array):
    """A partial copy (rsync) loses chunk files; Zarr reads an absent chunk as its fill value."""
    from adaspec.evaluate import evaluate

    cache = _copy_cache(env, tmp_path)
    chunks = sorted(p for p in (cache / "gsm8k/train" / array / "c").rglob("*") if p.is_file())
    assert chunks
    chunks[0].unlink()
    report = verify_cache(str(cache))
    assert not report.ok and array in report.message and "c/0" in report.message
    cfg = train_config(env, {"cache": str(cache)}, k=0.5, epochs=1, out=tmp_path / "run")
    err = _cli_error(capsys, lambda: train(cfg, progress=False))
    assert array in err and "missing chunk file" in err
    assert not (tmp_path / "run" / "model").exists()
    if array != "ref/ref/loss_fkl":  # offline evaluation reads sequences and target rows
        ev = train_config(env, {"cache": str(cache)})
        err = _cli_error(capsys, lambda: evaluate(ev, [str(env.ref_run)], ("offline",),
                                                  progress=False))
        assert array in err


@pytest.mark.parametrize("train_values", [{"lr": 1e6, "max_grad_norm": 0.0},
                                          {"lr": 1e9, "max_grad_norm": 0.0, "log_every": 4}])
def test_a_diverged_run_stops_in_one_line_and_saves_nothing_non_finite(
        env, tmp_path, capsys, train_values):
    cfg = train_config(env, k=1.0, epochs=2, checkpoint_every=1, out=tmp_path / "run",
                       **train_values)
    err = _cli_error(capsys, lambda: train(cfg, progress=False))
    assert re.search(r"training diverged at step \d+", err) and "--lr" in err
    run_dir = tmp_path / "run"
    assert not (run_dir / "model").exists()
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):  # what was kept is finite
        state = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_saving_and_exporting_refuse_non_finite_weights(env, tmp_path):
    model, tokenizer = models.load_model(f"{env.target}@layers=1")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(UserError, match="holds nan/inf"):
        models.save_model(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_train_owns_its_out_folder(env, tmp_path, capsys):
    # a folder that is not a run: refused, left as it was
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "step-1").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "model").mkdir()
    before = sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*"))
    err = _cli_error(capsys, lambda: train(train_config(env, k=1.0, epochs=1, out=foreign),
                                           progress=False))
    assert "not empty and not a run folder" in err
    assert sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*")) == before
    assert (foreign / "notes.txt").read_text() == "mine"
    # a run killed before its first checkpoint restarts cleanly, with or without --resume
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.yaml").write_text("models: {}\n")
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (killed / "checkpoints" / "step-00000001").mkdir(parents=True)  # an unfinished save
    for resume in (True, False):
        run_dir = train(train_config(env, k=1.0, epochs=1, out=killed), resume=resume,
                        progress=False)
        assert [m["step"] for m in run_metrics(run_dir) if "loss" in m] == [1, 2, 3, 4]
        if not resume:
            break
        shutil.rmtree(killed / "model")
        for checkpoint in (killed / "checkpoints").iterdir():
            shutil.rmtree(checkpoint)
    # a second training into a folder being trained is refused while the first holds it
    from adaspec import runs

    with runs.owned(tmp_path / "busy"):
        err = _cli_error(capsys, lambda: train(
            train_config(env, k=1.0, epochs=1, out=tmp_path / "busy"), progress=False))
    assert "another training is writing" in err


def test_a_reference_into_a_read_only_cache_is_refused_before_training(env, tmp_path,
                                                                       monkeypatch, capsys):
    """It used to train to the end and then die with a traceback while recording itself.
    (As root nothing is read-only: the permission is simulated.)"""
    import os

    real = os.access
    cache = str(env.cache)
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (
        mode == os.W_OK and str(p).startswith(cache)) else real(p, mode, *a, **k))
    cfg = train_config(env, stage="ref", epochs=1, out=tmp_path / "ref")
    err = _cli_error(capsys, lambda: train(cfg, progress=False))
    assert "not writable" in err and "--stage ref" in err
    assert not (tmp_path / "ref").exists()


def test_a_reference_built_with_model_path_is_checked_against_its_runs_init(env, tmp_path):
    """No manifest record (built with --model-path from a run folder): the run folder still
    says which draft it started from."""
    from cache_tools.manifest import write as write_manifest

    cache = _copy_cache(env, tmp_path)
    group = store.open_root(str(cache), "a")["gsm8k/train"]
    manifest = Manifest.read(group)
    manifest.refs = {}
    write_manifest(group, manifest)
    cfg = train_config(env, {"cache": str(cache)}, k=0.5, out=tmp_path / "d")
    cfg.models.draft = f"{env.target}@layers=2"  # the reference run started from layers=1
    with pytest.raises(UserError, match="trained from .*@layers=1 but this draft starts from"):
        train(cfg, progress=False)


def test_a_run_cannot_resume_against_another_reference(env, tmp_path, capsys):
    """Extending (or resuming) an AdaSPEC run after its reference was retrained would mix two
    references' selections in one run."""
    from adaspec.build import build_stage

    cache = _copy_cache(env, tmp_path)
    run_dir = train(train_config(env, {"cache": str(cache)}, k=0.5, epochs=1, out=tmp_path / "d"),
                    progress=False)
    other_ref = train(train_config(env, {"cache": str(cache)}, stage="ref", epochs=1, lr=3e-3,
                                   out=tmp_path / "ref2"), progress=False)
    build_stage(train_config(env, {"cache": str(cache)}), "ref", model_spec=str(other_ref),
                progress=False, rebuild=True)
    cfg = train_config(env, {"cache": str(cache)}, k=0.5, epochs=2, out=run_dir)
    err = _cli_error(capsys, lambda: train(cfg, resume=True, progress=False))
    assert "selected its tokens against the reference" in err
