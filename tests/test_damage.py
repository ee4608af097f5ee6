"""Damage (issue 20): each kind of file of a cache and of a run folder, deleted, truncated or
garbled in turn; verify, train, eval and export must refuse in one line (exit 2, no traceback)
and never report the damaged thing as good."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import GSM8K, train_config

from adaspec.cli import cache as cache_cli
from adaspec.cli import eval as eval_cli
from adaspec.cli import export as export_cli
from adaspec.cli import train as train_cli
from adaspec.cli.common import run

pytestmark = pytest.mark.usefixtures("one_thread")

CACHE_FILES = {
    "root metadata": "zarr.json",
    "manifest (split group)": "gsm8k/train/zarr.json",
    "stage group metadata": "gsm8k/train/target/zarr.json",
    "array metadata": "gsm8k/train/target/logprobs/zarr.json",
    "target chunk": "gsm8k/train/target/logprobs/c/0/0",
    "sequence chunk": "gsm8k/train/sequences/input_ids/c/0",
    "reference chunk": "gsm8k/train/ref/ref/loss_fkl/c/0",
}
DAMAGE = ("delete", "truncate", "garble")


def _damage(path: Path, how: str) -> None:
    assert path.is_file(), path
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 3, min(len(data), len(data) // 3 + 16)):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))


def _one_line_error(capsys, main, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, (argv, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, (argv, err[-2000:])
    return lines[0]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", list(CACHE_FILES))
def test_a_damaged_cache_is_refused_in_one_line(env, tmp_path, capsys, kind, how):
    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    _damage(cache / CACHE_FILES[kind], how)
    common = ["--cache", str(cache), "--task", "gsm8k", "--target", str(env.target)]
    _one_line_error(capsys, cache_cli.main, ["verify", "--cache", str(cache)])
    _one_line_error(capsys, train_cli.main, [
        *common, "--draft", f"{env.target}@layers=1", "--k", "0.5", "--batch-size", "2",
        "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    assert not (tmp_path / "run" / "model").exists()
    if kind != "reference chunk":  # offline evaluation reads no reference
        _one_line_error(capsys, eval_cli.main, [
            *common, "--split", "train", "--draft", str(env.ref_run), "--modes", "offline",
            "--no-progress"])


@pytest.mark.parametrize("field", ["count", "weight hash", "no digest"])
def test_a_manifest_damaged_where_it_still_parses_is_refused(env, tmp_path, capsys, field):
    """Garbling that leaves valid JSON (a count, a hex digit of a weight hash) is caught by the
    manifest's digest: not believed by verify, train or eval."""
    import json

    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    meta = cache / CACHE_FILES["manifest (split group)"]
    data = json.loads(meta.read_text())
    stages = data["attributes"]["manifest"]["stages"]
    if field == "count":
        stages["sequences"]["counts"]["label_tokens"] += 1
    elif field == "no digest":  # or a cache from before manifests had one
        del data["attributes"]["manifest_sha256"]
    else:
        model = stages["target"]["params"]["model"]
        model["weight_hash"] = model["weight_hash"][:-1] + \
            ("0" if model["weight_hash"][-1] != "0" else "1")
    meta.write_text(json.dumps(data))
    common = ["--cache", str(cache), "--task", "gsm8k", "--target", str(env.target)]
    for main, argv in (
            (cache_cli.main, ["verify", "--cache", str(cache)]),
            (train_cli.main, [*common, "--draft", f"{env.target}@layers=1", "--k", "1.0",
                              "--batch-size", "2", "--epochs", "1", "--out",
                              str(tmp_path / "run"), "--no-progress"]),
            (eval_cli.main, [*common, "--split", "train", "--draft", str(env.ref_run),
                             "--modes", "offline", "--no-progress"])):
        assert "digest" in _one_line_error(capsys, main, argv)
    assert not (tmp_path / "run" / "model").exists()


RUN_FILES = {
    "config": "config.yaml",
    "metrics": "metrics.jsonl",
    "model weights": "model/model.safetensors",
    "model config": "model/config.json",
    "checkpoint progress": "checkpoints/*/progress.json",
    "checkpoint weights": "checkpoints/*/model.safetensors",
    "checkpoint optimizer": "checkpoints/*/optimizer.safetensors",
    "checkpoint trainer state": "checkpoints/*/trainer.json",
    "checkpoint process state": "checkpoints/*/process-0.safetensors",
    "checkpoint RNG": "checkpoints/*/process-0.json",
}


@pytest.fixture(scope="module")
def finished_run(env, tmp_path_factory):
    from adaspec.train import train

    out = tmp_path_factory.mktemp("damage_run") / "run"
    return train(train_config(env, k=1.0, epochs=1, checkpoint_every=2, out=out), progress=False)


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", list(RUN_FILES))
def test_a_damaged_run_folder_is_refused_in_one_line(env, finished_run, tmp_path, capsys,
                                                      kind, how):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    [path] = list(run_dir.glob(RUN_FILES[kind]))
    _damage(path, how)
    uses = []
    if kind.startswith("checkpoint") or kind in ("config", "metrics"):
        uses.append((train_cli.main, [
            "--cache", str(env.cache), "--task", "gsm8k", "--target", str(env.target),
            "--draft", f"{env.target}@layers=1", "--k", "1.0", "--batch-size", "2",
            "--epochs", "2", "--checkpoint-every", "2", "--resume", "--out", str(run_dir),
            "--no-progress"]))
    if kind.startswith("model"):
        uses.append((export_cli.main, [str(run_dir), "--out", str(tmp_path / "export"),
                                       "--target", str(env.target)]))
        uses.append((eval_cli.main, [
            "--cache", str(env.cache), "--task", "gsm8k", "--split", "train", "--target",
            str(env.target), "--draft", str(run_dir), "--modes", "offline", "--no-progress"]))
    for main, argv in uses:
        _one_line_error(capsys, main, argv)


def test_verify_refuses_a_stage_still_building_and_a_manifest_that_contradicts_its_arrays(
        env, tmp_path):
    from cache_tools import store
    from cache_tools.manifest import Manifest
    from cache_tools.manifest import write as write_manifest
    from cache_tools.verify import verify_cache

    for change, word in (("building", "not complete"), ("mode", "tail_logmass")):
        cache = tmp_path / change
        shutil.copytree(env.cache, cache)
        group = store.open_root(str(cache), "a")["gsm8k/train"]
        manifest = Manifest.read(group)
        target = manifest.stages["target"]
        if change == "building":
            target.status = "building"
        else:  # the cache is top-K with a tail; the manifest now claims the other mode
            target.params["mode"] = "sample" if target.params["mode"] == "topk" else "topk"
        write_manifest(group, manifest)
        report = verify_cache(str(cache))
        assert not report.ok, change
        assert word in report.message or "counts" in report.message, report.message


def test_rebuild_repairs_damaged_sequences(env, tmp_path, capsys):
    """--rebuild used to repeat its own advice: the sequences are made again from the data
    (same settings, same sequences), the target stage rebuilt, and the store verifies whole."""
    from cache_tools.verify import verify_cache

    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    before = (cache / CACHE_FILES["sequence chunk"]).read_bytes()
    _damage(cache / CACHE_FILES["sequence chunk"], "delete")
    assert not verify_cache(str(cache)).ok
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(cache_cli.main, [
            "build", "--model", "target", "--rebuild", "--cache", str(cache), "--task", "gsm8k",
            "--data-files", str(GSM8K), "--limit", "8", "--target", str(env.target), "--topk",
            str(len(env.tok)), "--sparse", "topk", "--value-encoding", "float16",
            "--shard-rows", "256", "--chunk-rows", "128", "--batch-tokens", "1024",
            "--no-progress"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-1500:]
    assert verify_cache(str(cache)).ok
    assert (cache / CACHE_FILES["sequence chunk"]).read_bytes() == before
