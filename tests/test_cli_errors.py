"""Every CLI, fed bad values of every kind, answers in one line and leaves nothing that lies.

Each case runs a CLI's `main` through `cli.common.run` (what the console scripts call) and
asserts: exit code 2, exactly one line on stderr, naming the bad value, no traceback, and no
cache stage or run folder that claims to be complete and was not before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import (
    GSM8K,
    build_split_target,
    corrupt_chunks,
    make_tiny_tokenizer,
    save_tiny_model,
    train_config,
)

from adaspec.build import build_stage
from adaspec.cli import cache, eval, sweep, train
from adaspec.cli.common import run
from cache_tools import store
from cache_tools.manifest import Manifest
from cache_tools.manifest import write as write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

MAINS = {"cache": cache.main, "train": train.main, "eval": eval.main, "sweep": sweep.main}


@pytest.fixture(scope="module")
def bad(env, tmp_path_factory):
    """The tiny env plus: a test-split cache, a stale-reference copy, a corrupt copy, bad files."""
    root = tmp_path_factory.mktemp("cli_errors")
    build_stage(train_config(env, {}), "target", progress=False)  # already built: a no-op check
    build_split_target(env, "test", 4)
    stale = root / "stale"
    shutil.copytree(env.cache, stale)
    group = store.open_root(str(stale), "a")["gsm8k/train"]
    manifest = Manifest.read(group)
    manifest.stages["ref/ref"].params["model"]["weight_hash"] = "0" * 64  # another ref
    write_manifest(group, manifest)
    corrupt = root / "corrupt"
    shutil.copytree(env.cache, corrupt)
    corrupt_chunks(corrupt, "ids")
    malformed = root / "malformed.jsonl"
    malformed.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    yaml_bad = root / "bad.yaml"
    yaml_bad.write_text("data: [unclosed\n")
    other_tok = make_tiny_tokenizer(280)
    other = root / "other-tokenizer"
    save_tiny_model(other, other_tok, n_layers=1, seed=3)
    a_file = root / "a_file"
    a_file.write_text("not a cache")
    return SimpleNamespace(env=env, root=root, stale=stale, corrupt=corrupt, malformed=malformed,
                           yaml_bad=yaml_bad, other=other, a_file=a_file)


def _common(b) -> list[str]:
    e = b.env
    return ["--cache", str(e.cache), "--task", "gsm8k", "--target", str(e.target)]


def _data(b) -> list[str]:
    return ["--data-files", str(GSM8K), "--limit", "8"]


def _draft(b) -> list[str]:
    return ["--draft", f"{b.env.target}@layers=1"]


def _out(b, name: str) -> list[str]:
    return ["--out", str(b.root / "runs" / name)]


# (id, CLI, argv(b), a word the message must hold)
CASES = [
    # adaspec-cache build
    ("build-unknown-task", "cache", lambda b: ["build", "--model", "target", "--task", "nosuch",
                                               "--cache", str(b.root / "c1")], "nosuch"),
    ("build-unknown-split", "cache", lambda b: ["build", "--model", "target", "--split", "dev",
                                                "--cache", str(b.root / "c2")], "dev"),
    ("build-missing-data-file", "cache", lambda b: [
        "build", "--model", "target", "--task", "gsm8k", "--data-files",
        str(b.root / "missing.jsonl"), "--cache", str(b.root / "c3"), "--target",
        str(b.env.target)], "missing.jsonl"),
    ("build-malformed-data-file", "cache", lambda b: [
        "build", "--model", "target", "--task", "gsm8k", "--data-files", str(b.malformed),
        "--cache", str(b.root / "c4"), "--target", str(b.env.target)], "malformed.jsonl"),
    ("build-topk-zero", "cache", lambda b: ["build", "--model", "target", "--topk", "0"],
     "--topk"),
    ("build-draws-above-vocab", "cache", lambda b: [
        "build", "--model", "target", *_common(b)[:4], "--cache", str(b.root / "c5"),
        "--target", str(b.env.target), *_data(b), "--draws", "99999"], "99999"),
    ("build-topk-above-vocab", "cache", lambda b: [
        "build", "--model", "target", *_common(b)[:4], "--cache", str(b.root / "c5"),
        "--target", str(b.env.target), *_data(b), "--sparse", "topk", "--topk", "99999"],
     "99999"),
    ("build-draws-not-int", "cache", lambda b: ["build", "--model", "target", "--draws", "abc"],
     "abc"),
    ("build-topk-means-draws", "cache", lambda b: ["build", "--model", "target", "--topk", "8"],
     "--draws"),
    ("build-unknown-sparse-mode", "cache", lambda b: ["build", "--model", "target", "--sparse",
                                                      "dense"], "dense"),
    ("build-missing-model", "cache", lambda b: [
        "build", "--model", "target", "--task", "gsm8k", *_data(b), "--cache",
        str(b.root / "c6"), "--target", str(b.root / "no-model")], "no-model"),
    ("build-ref-not-recorded", "cache", lambda b: [
        "build", "--model", "ref", "--cache", str(b.env.cache), "--task", "gsm8k",
        "--ref-name", "nobody"], "--model-path"),
    ("build-cache-is-a-file", "cache", lambda b: [
        "build", "--model", "target", "--task", "gsm8k", *_data(b), "--target",
        str(b.env.target), "--cache", str(b.a_file)], "a_file"),
    ("build-limit-zero", "cache", lambda b: ["build", "--model", "target", "--limit", "0"],
     "--limit"),
    ("build-shard-rows", "cache", lambda b: ["build", "--model", "target", "--chunk-rows", "3",
                                             "--shard-rows", "10"], "--shard-rows"),
    ("build-missing-config", "cache", lambda b: [
        "build", "--model", "target", "--config", str(b.root / "none.yaml")], "none.yaml"),
    ("build-malformed-config", "cache", lambda b: [
        "build", "--model", "target", "--config", str(b.yaml_bad)], "bad.yaml"),
    ("build-other-k-on-a-complete-cache", "cache", lambda b: [
        "build", "--model", "target", *_common(b), *_data(b), "--topk", "8", "--sparse",
        "topk", "--value-encoding", "float16", "--shard-rows", "256", "--chunk-rows", "128"],
        "k=8"),
    ("build-unknown-flag", "cache", lambda b: ["build", "--model", "target", "--topk-k", "3"],
     "--topk-k"),
    # adaspec-cache info / verify / preview
    ("info-missing-cache", "cache", lambda b: ["info", "--cache", str(b.root / "nocache")],
     "nocache"),
    ("verify-missing-cache", "cache", lambda b: ["verify", "--cache", str(b.root / "nocache")],
     "nocache"),
    ("verify-corrupt-chunk", "cache", lambda b: ["verify", "--cache", str(b.corrupt)],
     "target/ids chunk"),
    ("preview-unknown-task", "cache", lambda b: ["preview", "--task", "nosuch"], "nosuch"),
    ("preview-missing-file", "cache", lambda b: [
        "preview", "--task", "gsm8k", "--data-files", str(b.root / "gone.jsonl"),
        "--target", str(b.env.target)], "gone.jsonl"),
    # adaspec-train
    ("train-missing-cache", "train", lambda b: [
        "--cache", str(b.root / "nocache"), "--task", "gsm8k", *_draft(b), *_out(b, "t1")],
     "nocache"),
    ("train-k-out-of-range", "train", lambda b: [*_common(b), "--k", "1.5"], "--k"),
    ("train-negative-lr", "train", lambda b: [*_common(b), "--lr", "-1"], "--lr"),
    ("train-zero-epochs", "train", lambda b: [*_common(b), "--epochs", "0"], "--epochs"),
    ("train-unknown-stage", "train", lambda b: [*_common(b), "--stage", "bogus"], "bogus"),
    ("train-missing-draft", "train", lambda b: [
        *_common(b), "--k", "1.0", "--draft", str(b.root / "no-draft"), *_out(b, "t2")],
     "no-draft"),
    ("train-resume-nothing", "train", lambda b: [
        *_common(b), *_draft(b), "--k", "1.0", "--resume", *_out(b, "t3")], "--resume"),
    ("train-limit-disagrees", "train", lambda b: [
        *_common(b), *_draft(b), "--k", "1.0", "--limit", "3", *_out(b, "t4")], "--limit"),
    ("train-batch-size-zero", "train", lambda b: [
        *_common(b), *_draft(b), "--k", "1.0", "--batch-size", "0", *_out(b, "t5")],
     "--batch-size"),
    ("train-stale-reference", "train", lambda b: [
        "--cache", str(b.stale), "--task", "gsm8k", "--target", str(b.env.target), *_draft(b),
        "--k", "0.5", *_out(b, "t6")], "--rebuild"),
    ("train-corrupt-chunk", "train", lambda b: [
        "--cache", str(b.corrupt), "--task", "gsm8k", "--target", str(b.env.target),
        *_draft(b), "--k", "1.0", *_out(b, "t7")], "target/ids chunk"),
    ("train-ref-name-missing", "train", lambda b: [
        *_common(b), *_draft(b), "--k", "0.5", "--ref-name", "nobody", *_out(b, "t8")],
     "nobody"),
    # adaspec-eval
    ("eval-missing-draft", "eval", lambda b: [
        *_common(b), "--split", "test", "--draft", str(b.root / "no-draft")], "no-draft"),
    ("eval-gamma-zero", "eval", lambda b: [*_common(b), *_draft(b), "--gamma", "0"], "--gamma"),
    ("eval-unknown-mode", "eval", lambda b: [*_common(b), *_draft(b), "--modes", "bogus"],
     "bogus"),
    ("eval-offline-without-cache", "eval", lambda b: [
        *_common(b), "--split", "validation", *_draft(b), "--modes", "offline"],
     "--modes exact,speculative"),
    ("eval-other-tokenizer", "eval", lambda b: [
        *_common(b), "--split", "test", "--draft", str(b.other), "--modes", "offline"],
     "other-tokenizer"),
    ("eval-negative-temperature", "eval", lambda b: [
        *_common(b), *_draft(b), "--temperature", "-1"], "--temperature"),
    ("eval-limit-disagrees", "eval", lambda b: [
        *_common(b), "--split", "test", *_draft(b), "--modes", "offline", "--limit", "3"],
     "--limit"),
    ("eval-data-files-disagree", "eval", lambda b: [
        *_common(b), "--split", "test", *_draft(b), "--modes", "offline", "--data-files",
        str(b.malformed)], "--data-files"),
    ("eval-zero-prompts", "eval", lambda b: [*_common(b), *_draft(b), "--prompts", "0"],
     "--prompts"),
    # adaspec-sweep
    ("sweep-k-out-of-range", "sweep", lambda b: [
        *_common(b)[:4], *_draft(b), "--k", "0.4,1.5", "--out", str(b.root / "s1")], "1.5"),
    ("sweep-epochs-not-numbers", "sweep", lambda b: [
        *_common(b)[:4], *_draft(b), "--epochs", "one", "--out", str(b.root / "s2")], "one"),
    ("sweep-unknown-loss", "sweep", lambda b: [
        *_common(b)[:4], *_draft(b), "--loss", "bogus", "--out", str(b.root / "s3")], "bogus"),
    ("sweep-no-eval-cache", "sweep", lambda b: [
        *_common(b)[:4], *_draft(b), "--k", "1.0", "--eval-split", "validation", "--out",
        str(b.root / "s4")], "validation"),
    ("sweep-missing-cache", "sweep", lambda b: [
        "--cache", str(b.root / "nocache"), "--task", "gsm8k", *_draft(b), "--k", "1.0",
        "--out", str(b.root / "s5")], "nocache"),
]


def _claims(root: Path) -> set[str]:
    """Everything under `root` that claims to be complete: stages and trained models."""
    claims = set()
    for meta in root.rglob("zarr.json"):
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (ValueError, OSError):
            continue
        for stage, entry in attrs.get("manifest", {}).get("stages", {}).items():
            if entry.get("status") == "complete":
                claims.add(f"{meta.parent}:{stage}")
    for model in root.rglob("model/config.json"):
        claims.add(str(model.parent))
    for result in root.rglob("result.json"):
        claims.add(str(result))
    return claims


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_complete(bad, case, capsys):
    _, cli, argv, word = case
    args = argv(bad)
    if cli != "cache" and "--no-progress" not in args:
        args = [*args, "--no-progress"]
    before = _claims(bad.root) | _claims(bad.env.root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(MAINS[cli], args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    assert word in lines[0], lines[0]
    after = _claims(bad.root) | _claims(bad.env.root)
    assert after <= before, after - before
