"""Phase 1 end to end on a tiny model: exact top-K, resume after SIGKILL, refusals, 2 processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    GSM8K,
    REPO,
    build_cache,
    cache_build_config,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_model,
    stage_file_bytes,
)

from adaspec.errors import UserError
from adaspec.labels import order_sequences, plan_batches
from adaspec.sparse import sample_rows, topk_rows
from cache_tools import schema, store
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest
from cache_tools.verify import verify_cache


def test_cached_topk_equals_full_log_softmax(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = cache_build_config(tmp_path / "c", tiny_model_dir)
    manifest = build_cache(cfg)
    assert manifest.is_complete("target")
    reader = store.CacheReader(str(tmp_path / "c"), "gsm8k", "train")
    model = make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=1)
    model.load_state_dict(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    )
    for s in range(reader.n_sequences):
        ids, mask = reader.sequence(s)
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)[None]).logits[0].double()
        full = torch.log_softmax(logits, -1)[np.nonzero(mask)[0] - 1]  # (n, V) float64
        values, top_ids = torch.topk(full, 8, dim=-1)
        rows = reader.target_rows(int(reader.label_offsets[s]), int(reader.label_offsets[s + 1]))
        # id_encoding "delta": the top-1 first, then the rest in id order.
        rest = np.argsort(top_ids.numpy()[:, 1:], axis=-1) + 1
        order = np.concatenate([np.zeros((len(rest), 1), dtype=rest.dtype), rest], axis=-1)
        np.testing.assert_array_equal(rows["ids"], np.take_along_axis(top_ids.numpy(), order, -1))
        # float16 storage: relative error of a log-prob is at most 2**-11.
        expected = np.take_along_axis(values.numpy(), order, -1)
        np.testing.assert_allclose(rows["logprobs"], expected, rtol=1e-3, atol=1e-3)
        rest = full.scatter(1, top_ids, float("-inf")).logsumexp(-1)
        np.testing.assert_allclose(rows["tail_logmass"], rest.numpy(), rtol=1e-4, atol=1e-5)
    assert verify_cache(str(tmp_path / "c")).ok


def test_topk_rows_and_sample_rows_match_dense_float64():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 40, generator=g, dtype=torch.float64) * 3
    rows = topk_rows(logits, 40)
    assert torch.all(torch.isneginf(rows["tail_logmass"]))  # K = V: nothing left over
    rows = topk_rows(logits, 6)
    lp = torch.log_softmax(logits, -1)
    mass = rows["logprobs"].double().exp().sum(-1) + rows["tail_logmass"].double().exp()
    torch.testing.assert_close(mass, torch.ones(50, dtype=torch.float64), atol=1e-6, rtol=0)
    sampled = sample_rows(logits, 64, torch.Generator().manual_seed(0))
    assert torch.all(sampled["counts"].sum(-1) == 64)
    used = sampled["counts"] > 0
    torch.testing.assert_close(
        sampled["logprobs"][used], lp.float().gather(1, sampled["ids"])[used], atol=1e-6, rtol=0
    )


def test_order_and_batch_plan():
    from adaspec.tasks import TokenizedExample

    exs = [
        TokenizedExample(list(range(n)), [-100] * (n // 2) + list(range(n - n // 2)), i)
        for i, n in enumerate([5, 9, 7, 9, 3])
    ]
    exs.append(TokenizedExample([1, 2, 3], [-100, -100, -100], 5))  # no label: dropped
    ids, masks, src = order_sequences(exs)
    assert [len(x) for x in ids] == [9, 9, 7, 5, 3] and src == [1, 3, 2, 0, 4]
    batches = plan_batches(np.array([len(x) for x in ids]), 18)
    assert batches == [(0, 2), (2, 4), (4, 5)]


def test_mismatched_settings_are_refused_in_one_line(tmp_path, tiny_model_dir):
    build_cache(cache_build_config(tmp_path / "c", tiny_model_dir))
    with pytest.raises(CacheError) as err:
        build_cache(cache_build_config(tmp_path / "c", tiny_model_dir, topk=4))
    assert "k=8" in str(err.value) and "k=4" in str(err.value) and "\n" not in str(err.value)
    # Another tokenizer: a model dir whose tokenizer has another vocabulary.
    other = tmp_path / "other"
    tok = make_tiny_tokenizer(vocab_size=280)
    save_tiny_model(other, tok, seed=3)
    with pytest.raises(CacheError) as err:
        build_cache(cache_build_config(tmp_path / "c", other))
    assert "tokenizer_fingerprint" in str(err.value)
    with pytest.raises(UserError, match="--topk 999"):
        build_cache(cache_build_config(tmp_path / "d", tiny_model_dir, topk=999))


def test_ref_stage_with_k_equal_v_gives_dense_kl(tmp_path, tiny_model_dir, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    cfg = cache_build_config(tmp_path / "c", tiny_model_dir, topk=vocab)
    build_cache(cfg)
    ref_dir = tmp_path / "ref"
    save_tiny_model(ref_dir, tiny_tokenizer, n_layers=1, seed=7)
    manifest = build_cache(cfg, "ref", str(ref_dir))
    assert manifest.is_complete("ref/ref")
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    reader = store.CacheReader(str(tmp_path / "c"), "gsm8k", "train")
    stored = reader.ref_losses("ref", "fkl", 0, reader.n_label_rows)
    dense = []
    for s in range(reader.n_sequences):
        ids, mask = reader.sequence(s)
        pos = np.nonzero(mask)[0] - 1
        with torch.no_grad():
            p = torch.log_softmax(target(torch.from_numpy(ids)[None]).logits[0].double(), -1)[pos]
            q = torch.log_softmax(ref(torch.from_numpy(ids)[None]).logits[0].double(), -1)[pos]
        dense.append((p.exp() * (p - q)).sum(-1).numpy())
    # The only difference from dense float64: the target's log-probs stored as float16.
    np.testing.assert_allclose(stored, np.concatenate(dense), rtol=2e-2, atol=2e-3)


def _build_args(cache: Path, model_dir: Path, extra=()) -> list[str]:
    """`adaspec-cache build` arguments of the crash and multi-process tests."""
    return ["build", "--model", "target", "--target", str(model_dir), "--task", "gsm8k",
            "--data-files", str(GSM8K), "--limit", "40", "--max-length", "512",
            "--cache", str(cache), "--draws", "16", "--shard-rows", "1024",
            "--chunk-rows", "256", "--batch-tokens", "2048", *extra]


def _cli_build(cache: Path, model_dir: Path, extra=(), env=None, **popen):
    cmd = [sys.executable, "-m", "adaspec.cli.cache", *_build_args(cache, model_dir, extra)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, **popen)


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """A wider tiny model so a build lasts long enough to be killed part way."""
    path = tmp_path_factory.mktemp("wide")
    tok = make_tiny_tokenizer()
    save_tiny_model(path, tok, n_layers=4, seed=2, hidden=256)
    return path


def _done_count(root: Path) -> int:
    done = root / "gsm8k" / "train" / "target" / schema.DONE / "c"
    return sum(1 for p in done.rglob("*") if p.is_file()) if done.exists() else 0


def _kill_when(proc, ready, rng, timeout=300.0) -> bool:
    """SIGKILL `proc` a random moment after `ready()` turns true; False if it finished first."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path, slow_model_dir):
    clean = tmp_path / "clean"
    proc = _cli_build(clean, slow_model_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=600) == 0
    n_shards = _done_count(clean)
    assert n_shards >= 6

    killed = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    # First kill: while the sequences are being written or the model loads.
    proc = _cli_build(killed, slow_model_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kills += _kill_when(proc, lambda: (killed / "zarr.json").exists(), rng)
    # Then: each time at a random moment after at least one more shard was written.
    for _ in range(6):
        before = _done_count(killed)
        proc = _cli_build(
            killed, slow_model_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        kills += _kill_when(proc, lambda b=before: _done_count(killed) > b, rng)
        if kills >= 4:
            break
    assert kills >= 4
    group = store.open_root(str(killed), "r")["gsm8k/train"]
    assert not Manifest.read(group).is_complete("target")
    with pytest.raises(CacheError, match="no complete 'target'"):
        store.CacheReader(str(killed), "gsm8k", "train")
    proc = _cli_build(killed, slow_model_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    a, b = stage_file_bytes(clean), stage_file_bytes(killed)
    assert a.keys() == b.keys() and len(a) > 10
    assert [k for k in a if a[k] != b[k]] == []
    assert verify_cache(str(killed)).ok


def test_a_concurrent_second_build_is_refused(tmp_path, slow_model_dir):
    first = _cli_build(
        tmp_path / "c", slow_model_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    lease = tmp_path / "c" / "_leases" / "gsm8k.train.rank0" / "zarr.json"  # the build's lease
    deadline = time.time() + 120
    while not lease.exists() and time.time() < deadline:
        time.sleep(0.2)
    second = _cli_build(
        tmp_path / "c", slow_model_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err2 = second.communicate(timeout=300)
    first.wait(timeout=600)
    assert first.returncode == 0
    assert second.returncode == 2
    assert "another build" in err2.decode() and "Traceback" not in err2.decode()


def test_two_process_build_equals_one_process_build(tmp_path, tiny_model_dir):
    one = _cli_build(
        tmp_path / "one", tiny_model_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert one.wait(timeout=600) == 0
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # --multi_gpu starts N processes (gloo on a CPU-only machine); --cpu would start one.
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "adaspec.cli.cache",
        *_build_args(tmp_path / "two", tiny_model_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = stage_file_bytes(tmp_path / "one"), stage_file_bytes(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 5
    assert [k for k in a if a[k] != b[k]] == []
    group = store.open_root(str(tmp_path / "two"), "r")["gsm8k/train"]
    assert Manifest.read(group).is_complete("target")
    assert "[rank 1]" in result.stderr  # two processes really ran, each with its own bar


def test_generate_caches_the_targets_own_samples(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = cache_build_config(tmp_path / "c", tiny_model_dir, generate=True, gen_max_new_tokens=12)
    manifest = build_cache(cfg)
    assert manifest.is_complete("target")
    assert manifest.sequence_params["generate"]["max_new_tokens"] == 12
    reader = store.CacheReader(str(tmp_path / "c"), "gsm8k", "train")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert reader.n_sequences == 8
    for s in range(reader.n_sequences):
        ids, mask = reader.sequence(s)
        n_new = int(mask.sum())
        assert 1 <= n_new <= 12 and mask[-n_new:].all() and not mask[:-n_new].any()
        # The stored rows are the generation's own distributions: they agree with a
        # teacher-forced pass over the generated tokens.
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)[None]).logits[0].double()
        full = torch.log_softmax(logits, -1)[np.nonzero(mask)[0] - 1]
        rows = reader.target_rows(int(reader.label_offsets[s]), int(reader.label_offsets[s + 1]))
        # The first cached entry is the target's greedy token, exactly.
        np.testing.assert_array_equal(rows["ids"][:, 0], full.argmax(-1).numpy())
        np.testing.assert_allclose(
            rows["logprobs"], full.gather(1, torch.from_numpy(rows["ids"])).numpy(), atol=2e-3
        )
    assert verify_cache(str(tmp_path / "c")).ok
    again = build_cache(cfg)  # everything is staged and stored: a no-op that changes nothing
    assert again.stage("target") == manifest.stage("target")
