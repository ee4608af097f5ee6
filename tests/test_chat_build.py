"""Task chat through the cache on a tiny chat model: regeneration turn by turn (deterministic
under its seed, resumable after SIGKILL, exported and read back to the same arrays), and the
whole pipeline from a conversation file to an exported draft."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import CHAT_FIXTURES, REPO, TINY_CHAT_TEMPLATE, make_tiny_tokenizer, save_tiny_model

from adaspec import tasks
from adaspec.cli import cache as cache_cli
from cache_tools import schema, store
from cache_tools.verify import verify_cache

CONVERSATIONS = CHAT_FIXTURES / "conversations.jsonl"
SHAREGPT = CHAT_FIXTURES / "sharegpt.json"


def _chat_tokenizer(template: str):
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def _chat_model(path: Path, **kw) -> Path:
    return save_tiny_model(path, _chat_tokenizer(TINY_CHAT_TEMPLATE), **kw)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return _chat_model(tmp_path_factory.mktemp("chat_target"), seed=1)


def _build_args(cache: Path, model: Path, data: Path = CONVERSATIONS, extra=()) -> list[str]:
    return ["build", "--model", "target", "--target", str(model), "--task", "chat",
            "--data-files", str(data), "--max-length", "1024", "--cache", str(cache),
            "--topk", "8", "--sparse", "topk", "--value-encoding", "float16",
            "--batch-tokens", "2048", "--no-progress", *extra]


GENERATE = ("--generate", "--gen-max-new-tokens", "12", "--limit", "12")


def _files(root: Path, stages=("sequences", "target")) -> dict[str, bytes]:
    out = {}
    for stage in stages:
        for path in sorted((root / "chat" / "train" / stage).rglob("*")):
            if path.is_file() and schema.DONE not in path.parts:
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def _export(cache: Path, capsysbinary, split: str = "train") -> list[dict]:
    assert cache_cli.main(["export-data", "--cache", str(cache), "--task", "chat",
                           "--split", split]) == 0
    return [json.loads(line) for line in capsysbinary.readouterr().out.decode().splitlines()]


def test_regeneration_rewrites_every_answer_and_is_deterministic(
        tmp_path, chat_model, capsysbinary, one_thread):
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    assert cache_cli.main(_build_args(a, chat_model, extra=GENERATE)) == 0
    assert cache_cli.main(_build_args(b, chat_model, extra=GENERATE)) == 0
    assert cache_cli.main(_build_args(other, chat_model,
                                      extra=(*GENERATE, "--cache-seed", "1"))) == 0
    capsysbinary.readouterr()
    files = _files(a)
    assert len(files) > 10 and files == _files(b)
    assert verify_cache(str(a)).ok

    exported = _export(a, capsysbinary)
    assert exported == _export(b, capsysbinary)
    assert exported != _export(other, capsysbinary)
    sources = tasks.load_examples("chat", "train", CONVERSATIONS, limit=12)
    originals = [json.loads(line) for line in CONVERSATIONS.read_text().splitlines()]
    by_id = {row["id"]: row for row in originals}
    reader = store.CacheReader(str(a), "chat", "train")
    assert len(exported) == reader.n_sequences <= len(sources)
    rewritten = 0
    for row in exported:
        source = by_id[row["id"]]["messages"]
        turns = row["messages"]
        assert 2 <= len(turns) <= len(source)
        for turn, original in zip(turns, source, strict=False):
            assert turn["role"] == original["role"]
            if turn["role"] == "assistant":  # tiny random model: its own text, never the data's
                rewritten += turn["content"] != original["content"]
            else:  # system and user turns are kept as they were
                assert turn["content"] == original["content"]
    assert rewritten == sum(t["role"] == "assistant" for r in exported for t in r["messages"])
    counts = reader.manifest.stage(schema.SEQUENCES).counts
    assert {"conversations_cut", "conversations_skipped", "regenerated_cut",
            "regenerated_skipped"} <= counts.keys()
    assert reader.sequence_params["generate"]["model"]


def test_exported_conversations_build_the_same_sequences(
        tmp_path, chat_model, capsysbinary, one_thread):
    """export-data round-trips: the exported rows, built again without --generate, are the
    regenerated cache's sequences, token for token and label for label."""
    generated = tmp_path / "generated"
    assert cache_cli.main(_build_args(generated, chat_model, extra=GENERATE)) == 0
    capsysbinary.readouterr()
    exported = _export(generated, capsysbinary)
    path = tmp_path / "regenerated.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in exported))
    again = tmp_path / "again"
    assert cache_cli.main(_build_args(again, chat_model, path, ("--split", "all"))) == 0
    capsysbinary.readouterr()
    first = store.CacheReader(str(generated), "chat", "train")
    second = store.CacheReader(str(again), "chat", "all")
    for x, y in zip(first.all_tokens(), second.all_tokens(), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(first.offsets, second.offsets)
    assert _export(again, capsysbinary, "all") == exported


def test_export_data_of_a_plain_cache_is_the_input(tmp_path, chat_model, capsysbinary):
    cache = tmp_path / "c"
    assert cache_cli.main(_build_args(cache, chat_model, SHAREGPT, ("--split", "all",
                                                                   "--max-length", "4096"))) == 0
    capsysbinary.readouterr()
    assert _export(cache, capsysbinary, "all") == json.loads(SHAREGPT.read_text())


def _cli(args: list[str], **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adaspec.cli.cache", *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def test_sigkill_during_regeneration_then_resume_is_identical(tmp_path_factory, tmp_path):
    model = _chat_model(tmp_path_factory.mktemp("wide_chat"), seed=2, hidden=128)
    extra = ("--generate", "--gen-max-new-tokens", "16", "--batch-tokens", "1024", "--limit",
             "10")
    clean = tmp_path / "clean"
    proc = _cli(_build_args(clean, model, extra=extra), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    staging = tmp_path / "killed.staging" / "chat-train"

    def staged() -> int:
        return len(list(staging.glob("batch-*[0-9].json"))) if staging.is_dir() else 0

    n_batches = len(list((tmp_path / "clean.staging" / "chat-train").glob("batch-*[0-9].json")))
    assert n_batches == 10
    rng, kills, mid_regeneration = random.Random(7), 0, 0
    for _ in range(6):
        before = staged()
        proc = _cli(_build_args(tmp_path / "killed", model, extra=extra),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while staged() <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
            mid_regeneration += staged() < n_batches
        if kills >= 3:
            break
    assert kills >= 3 and mid_regeneration >= 1
    proc = _cli(_build_args(tmp_path / "killed", model, extra=extra), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert _files(tmp_path / "killed") == _files(clean)
    a = store.CacheReader(str(clean), "chat", "train")
    b = store.CacheReader(str(tmp_path / "killed"), "chat", "train")
    assert a.texts() == b.texts()


def test_an_unknown_role_is_one_line_and_no_traceback(tmp_path, chat_model):
    path = tmp_path / "chat.jsonl"
    lines = CONVERSATIONS.read_text().splitlines()[:3]
    lines[1] = lines[1].replace('"role": "user"', '"role": "narrator"', 1)
    path.write_text("\n".join(lines) + "\n")
    proc = _cli(_build_args(tmp_path / "c", chat_model, path), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.strip().splitlines() == [
        "error: chat.jsonl line 2: turn 1 has role 'narrator'; use one of system, user, "
        "assistant"]


def test_conversations_to_an_exported_draft(tmp_path, chat_model, one_thread):
    """Chat fixture -> target cache of regenerated conversations -> reference -> AdaSPEC draft
    validated on the target's own continuations of validation conversations -> evaluation
    (exact and real speculative decoding on test conversations) -> export."""
    from adaspec.cli import eval as eval_cli
    from adaspec.cli import export as export_cli
    from adaspec.cli import train as train_cli

    data = ["--task", "chat", "--data-files", str(SHAREGPT), "--max-length", "1024"]
    models_ = ["--target", str(chat_model), "--draft", f"{chat_model}@layers=1"]
    cache = ["--cache", str(tmp_path / "cache")]
    train = [*data, *models_, *cache, "--epochs", "1", "--batch-size", "4", "--no-progress"]
    assert cache_cli.main(_build_args(tmp_path / "cache", chat_model, SHAREGPT, GENERATE)) == 0
    assert train_cli.main([*train, "--stage", "ref", "--out", str(tmp_path / "ref")]) == 0
    assert cache_cli.main(["build", "--model", "ref", *data, "--target", str(chat_model),
                           *cache, "--limit", "12", "--no-progress"]) == 0
    continuations = tmp_path / "continuations"
    assert cache_cli.main(_build_args(continuations, chat_model, SHAREGPT, (
        "--split", "validation", "--generate", "--gen-temperature", "0",
        "--gen-max-new-tokens", "12"))) == 0
    assert train_cli.main([*train, "--limit", "12", "--k", "0.4", "--eval-split", "validation",
                           "--eval-cache", str(continuations), "--eval-every", "2",
                           "--keep-best", "--out", str(tmp_path / "ada")]) == 0
    records = [json.loads(line) for line in (tmp_path / "ada" / "metrics.jsonl").open()]
    checks = [r["validation"] for r in records if "validation" in r]
    assert checks and all(c["label_tokens"] > 0 for c in checks)
    result = tmp_path / "eval.json"
    assert eval_cli.main(["--draft", str(tmp_path / "ada"), *data, "--target", str(chat_model),
                          *cache, "--split", "test", "--modes", "exact,speculative",
                          "--prompts", "2", "--max-new-tokens", "8", "--gamma", "2",
                          "--no-speed", "--no-progress", "--json", str(result)]) == 0
    text = result.read_text()
    assert '"exact"' in text and '"speculative"' in text
    assert export_cli.main([str(tmp_path / "ada"), "--target", str(chat_model),
                            "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "config.json").is_file()


@pytest.mark.parametrize("data", [CONVERSATIONS, SHAREGPT], ids=["openai", "sharegpt"])
def test_build_train_and_evaluate_a_file_in_either_shape(tmp_path, chat_model, data, one_thread):
    from adaspec.cli import eval as eval_cli
    from adaspec.cli import train as train_cli

    flags = ["--task", "chat", "--data-files", str(data), "--max-length", "1024",
             "--target", str(chat_model), "--cache", str(tmp_path / "cache"), "--limit", "12"]
    assert cache_cli.main(_build_args(tmp_path / "cache", chat_model, data, ("--limit", "12"))) == 0
    assert train_cli.main([*flags, "--draft", f"{chat_model}@layers=1", "--stage", "ref",
                           "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "run"),
                           "--no-progress"]) == 0
    assert eval_cli.main(["--draft", str(tmp_path / "run"), *flags, "--modes", "exact",
                          "--no-progress"]) == 0


def test_a_cache_rendered_by_another_chat_template_is_refused(tmp_path):
    from cache_tools.errors import CacheError

    first = save_tiny_model(tmp_path / "first", _chat_tokenizer(TINY_CHAT_TEMPLATE), seed=1)
    other = _chat_tokenizer(TINY_CHAT_TEMPLATE.replace("<{{ m['role'] }}>", "[{{ m['role'] }}]"))
    second = save_tiny_model(tmp_path / "second", other, seed=1)
    args = ("--limit", "4")
    assert cache_cli.main(_build_args(tmp_path / "c", first, extra=args)) == 0
    with pytest.raises(CacheError, match="chat_template_sha256"):
        cache_cli.main(_build_args(tmp_path / "c", second, extra=args))
