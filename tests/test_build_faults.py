"""Phase 1 faults: padded vocabulary heads, a model's own generation settings, stale --generate
staging, non-finite target rows and training run folders given as --model-path.

Each test drives a real build on a tiny random model and checks what ends up in the store.
"""

from __future__ import annotations

import re
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import (
    GSM8K,
    build_cache,
    cache_build_config,
    make_tiny_model,
    save_tiny_model,
    stage_file_bytes,
)

from adaspec import build, generate, labels, models, runs
from adaspec.errors import UserError
from cache_tools import schema, store
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest
from cache_tools.verify import verify_cache

PADDING_ROWS = 20  # head rows past the tokenizer, as Pythia, Phi-2 and Qwen have


def _generate_config(cache, model_dir, temperature: float, **cache_kw):
    """The settings of a --generate build: 12 new tokens per prompt at `temperature`."""
    return cache_build_config(cache, model_dir, generate=True, gen_max_new_tokens=12,
                              gen_temperature=temperature, **cache_kw)


def _generations(cache) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(generated tokens, decoded target rows) of every sequence of a --generate cache."""
    reader = store.CacheReader(str(cache), "gsm8k", "train")
    out = []
    for s in range(reader.n_sequences):
        ids, mask = reader.sequence(s)
        rows = reader.target_rows(int(reader.label_offsets[s]), int(reader.label_offsets[s + 1]))
        out.append((ids[mask], rows))
    return out


def _status(cache, stage: str) -> str | None:
    group = store.open_root(str(cache), "r")["gsm8k/train"]
    stage_entry = Manifest.read(group).stage(stage)
    return None if stage_entry is None else stage_entry.status


# ---------------------------------------------------------------------------------------------
# 1. A padded head: generation must never draw an id the tokenizer cannot produce


@pytest.fixture(scope="module")
def padded_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny target whose head has PADDING_ROWS extra rows, made large so that an uncut
    distribution puts nearly all its mass (and its argmax) on them."""
    path = tmp_path_factory.mktemp("padded")
    vocab = len(tiny_tokenizer)
    model = make_tiny_model(vocab + PADDING_ROWS, seed=1)
    with torch.no_grad():
        model.lm_head.weight[vocab:] *= 50.0
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_a_padded_head_samples_only_tokenizer_ids(
    tmp_path, padded_model_dir, tiny_tokenizer, one_thread, temperature
):
    vocab = len(tiny_tokenizer)
    cache = tmp_path / "c"
    cfg = _generate_config(cache, padded_model_dir, temperature)
    build_cache(cfg)
    generations = _generations(cache)
    tokens = np.concatenate([g for g, _ in generations])
    assert tokens.size > 0 and tokens.max() < vocab
    if temperature == 0:  # greedy over the cut distribution: the cached top-1, exactly
        for generated, rows in generations:
            np.testing.assert_array_equal(generated, rows["ids"][:, 0])
    assert verify_cache(str(cache)).ok


def test_sequence_writer_refuses_ids_outside_the_vocabulary(tmp_path):
    group = store.open_root(str(tmp_path / "c")).require_group("gsm8k").require_group("train")
    ids = [np.array([5, 7, 9]), np.array([3, 300, 4])]
    masks = [np.array([False, True, True])] * 2
    writer = store.CacheWriter(str(tmp_path / "c"), "gsm8k", "train")
    with pytest.raises(CacheError) as err:
        writer.write_sequences(ids, masks, [11, 42], vocab_size=300,
                               params={schema.TOKENIZER_FINGERPRINT: "x"})
    message = str(err.value)
    assert "source index 42" in message and "300" in message and "\n" not in message
    assert schema.SEQUENCES not in group  # nothing half-written


# ---------------------------------------------------------------------------------------------
# 2. The model's generation_config.json must not change what --generate does


@pytest.fixture(scope="module")
def configured_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny target saved with a generation_config.json full of settings that would change
    both greedy and sampled generations if they were inherited."""
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("configured")
    model = make_tiny_model(len(tiny_tokenizer), seed=1)
    model.generation_config = GenerationConfig(
        do_sample=True,
        repetition_penalty=3.0,
        no_repeat_ngram_size=2,
        min_p=0.9,
        top_k=5,
        top_p=0.5,
        min_new_tokens=12,
        suppress_tokens=[3, 4],
        bad_words_ids=[[5], [6]],
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    assert (path / "generation_config.json").is_file()
    return path


def test_greedy_generate_ignores_the_models_generation_config(
    tmp_path, configured_model_dir, one_thread
):
    cache = tmp_path / "c"
    build_cache(_generate_config(cache, configured_model_dir, 0.0))
    for generated, rows in _generations(cache):
        # Each token is the argmax of the cached, untempered distribution at its position.
        np.testing.assert_array_equal(generated, rows["ids"][:, 0])


def test_sampled_generate_draws_from_the_full_cached_distribution(
    tmp_path, configured_model_dir, tiny_tokenizer, one_thread
):
    """At T=1 the draws follow the cached distribution itself: with a near-uniform tiny model
    most fall outside its 50 likeliest ids (min_p=0.9 or top_k=5 would keep at most ~25)."""
    vocab = len(tiny_tokenizer)
    cache = tmp_path / "c"
    build_cache(_generate_config(cache, configured_model_dir, 1.0, topk=vocab))
    ranks = []
    for generated, rows in _generations(cache):
        for token, ids, logprobs in zip(generated, rows["ids"], rows["logprobs"], strict=True):
            ranks.append(int((logprobs > logprobs[ids == token][0]).sum()))
    assert len(ranks) >= 40
    assert np.mean(np.array(ranks) >= 50) > 0.5


# ---------------------------------------------------------------------------------------------
# 3. Staged generations are tied to the settings that made them


def test_staging_from_an_interrupted_build_at_another_temperature_is_not_reused(
    tmp_path, tiny_model_dir, one_thread
):
    from accelerate import PartialState

    cache = tmp_path / "c"
    hot = _generate_config(cache, tiny_model_dir, 3.0)
    model, tokenizer = models.load_model(str(tiny_model_dir))
    # An interrupted T=3 build: every batch staged, nothing written to the store yet.
    identity = models.model_identity(str(tiny_model_dir))
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    generate.generate_batches(hot, model, tokenizer, PartialState(cpu=True), progress=False,
                              identity=identity,
                              sequence_params=build.sequence_params(hot, fingerprint))
    staging = generate.staging_dir(hot)
    assert len(list(staging.glob("batch-*.npz"))) > 0

    cold = _generate_config(cache, tiny_model_dir, 0.0)
    manifest = build_cache(cold)
    assert manifest.sequence_params["generate"]["temperature"] == 0.0
    assert manifest.is_complete("target")
    for generated, rows in _generations(cache):
        np.testing.assert_array_equal(generated, rows["ids"][:, 0])  # greedy, not T=3 samples
    assert verify_cache(str(cache)).ok


# ---------------------------------------------------------------------------------------------
# 4. Non-finite target log-probs are refused, naming the example, and the build resumes


@pytest.fixture(scope="module")
def clean_uint8q(tmp_path_factory, tiny_model_dir):
    """A clean uint8q build with small shards: the reference the faulty builds resume to."""
    cache = tmp_path_factory.mktemp("clean") / "c"
    build_cache(cache_build_config(cache, tiny_model_dir, value_encoding="uint8q", shard_rows=128,
                                   chunk_rows=128))
    reader = store.CacheReader(str(cache), "gsm8k", "train")
    last = reader.n_sequences - 1  # the shortest sequence: in the last batch and shard
    ids, _ = reader.sequence(last)
    return cache, ids.copy(), int(reader.source_index[last])


def _poisoned_logits(poisoned_ids: np.ndarray, label_token: int, value: float):
    """`labels.LabelLogits` with one logit of one label row of one sequence set to `value`
    (what a build would see from a target that misbehaves on that token)."""

    class Poisoned(labels.LabelLogits):
        def __init__(self, model, batch, vocab_size=None):
            super().__init__(model, batch, vocab_size)
            self.bad = []
            for b in range(batch.input_ids.shape[0]):
                n = int(batch.attention_mask[b].sum())
                if np.array_equal(batch.input_ids[b, :n].numpy(), poisoned_ids):
                    rows = torch.nonzero(batch.index_b == b)[:, 0]
                    self.bad.append(int(rows[label_token]))

        def __call__(self, start=0, stop=None):
            logits = super().__call__(start, stop).clone()
            for row in self.bad:
                if start <= row < (self.n_rows if stop is None else stop):
                    logits[row - start, 7] = value
            return logits

    return Poisoned


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_target_rows_are_refused_and_the_build_resumes(
    tmp_path, tiny_model_dir, clean_uint8q, one_thread, value
):
    from adaspec.build import build_stage

    clean, poisoned_ids, source = clean_uint8q
    cache = tmp_path / "c"
    cfg = cache_build_config(cache, tiny_model_dir, value_encoding="uint8q", shard_rows=128,
                             chunk_rows=128)
    with (mock.patch.object(labels, "LabelLogits", _poisoned_logits(poisoned_ids, 2, value)),
          pytest.raises(UserError) as err):
        build_stage(cfg, "target", progress=False)
    message = str(err.value)
    assert "\n" not in message and "non-finite" in message
    assert re.search(rf"\bexample {source}\b", message) and "label token 2" in message
    # Left resumable: the stage is not complete, the shards before the bad row are kept.
    assert _status(cache, schema.TARGET) == schema.STATUS_BUILDING
    done = store.open_root(str(cache), "r")["gsm8k/train/target"][schema.DONE][:]
    assert 0 < done.sum() < len(done)
    # A sound model resumes it to exactly the clean build.
    manifest = build_cache(cfg)
    assert manifest.is_complete("target")
    a, b = stage_file_bytes(clean), stage_file_bytes(cache)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def test_generate_refuses_nonfinite_logits_naming_the_example(
    tmp_path, tiny_model_dir, one_thread
):
    from adaspec.build import build_stage

    cache = tmp_path / "c"
    cfg = _generate_config(cache, tiny_model_dir, 0.0)
    model, tokenizer = models.load_model(str(tiny_model_dir))

    def first_row_nan(module, inputs, output):
        output = output.clone()
        output[0, :, 11] = float("nan")
        return output

    model.lm_head.register_forward_hook(first_row_nan)
    with (mock.patch.object(models, "load_model", lambda *a, **k: (model, tokenizer)),
          pytest.raises(UserError) as err):
        build_stage(cfg, "target", progress=False)
    message = str(err.value)
    assert "\n" not in message and "non-finite" in message
    assert re.search(r"\bexample \d+\b", message)
    assert _status(cache, schema.SEQUENCES) is None  # nothing claims to be complete


def test_rows_with_masked_ids_are_kept(tmp_path, tiny_model_dir, clean_uint8q, one_thread):
    """A guard against over-refusal: -inf logits (masked ids) leave a finite distribution."""
    from adaspec.build import build_stage

    clean, poisoned_ids, _ = clean_uint8q
    cache = tmp_path / "c"
    cfg = cache_build_config(cache, tiny_model_dir, value_encoding="uint8q", shard_rows=128,
                             chunk_rows=128)
    with mock.patch.object(labels, "LabelLogits",
                           _poisoned_logits(poisoned_ids, 2, float("-inf"))):
        manifest = build_stage(cfg, "target", progress=False)
    assert manifest.is_complete("target")
    assert verify_cache(str(cache)).ok


# ---------------------------------------------------------------------------------------------
# 5. --model-path takes a training run folder, as adaspec-eval --draft does


def _cli_args(cache, role: str, model_path) -> list[str]:
    return ["build", "--model", role, "--model-path", str(model_path), "--task", "gsm8k",
            "--data-files", str(GSM8K), "--limit", "4", "--max-length", "512",
            "--cache", str(cache), "--draws", "8", "--shard-rows", "256", "--chunk-rows", "128",
            "--batch-tokens", "512", "--no-progress"]


def test_build_accepts_a_training_run_folder(
    tmp_path, tiny_model_dir, tiny_tokenizer, one_thread, capsys
):
    from adaspec.cli.cache import main

    target_run = tmp_path / "target-run"
    shutil.copytree(tiny_model_dir, target_run / "model")
    ref_run = tmp_path / "ref-run"  # what `adaspec-train --stage ref` leaves
    save_tiny_model(ref_run / "model", tiny_tokenizer, n_layers=1, seed=7)
    (ref_run / "checkpoints").mkdir()

    cache = tmp_path / "c"
    assert main(_cli_args(cache, "target", target_run)) == 0
    assert main(_cli_args(cache, "ref", ref_run)) == 0
    group = store.open_root(str(cache), "r")["gsm8k/train"]
    manifest = Manifest.read(group)
    assert manifest.is_complete("target") and manifest.is_complete("ref/ref")
    assert manifest.target_params["model"]["path"] == str((target_run / "model").resolve())
    assert manifest.stage("ref/ref").params["model"]["path"] == str((ref_run / "model").resolve())
    assert runs.resolve_run_folder(str(ref_run)) == str(ref_run / "model")
    assert runs.resolve_run_folder(str(tiny_model_dir)) == str(tiny_model_dir)
    assert runs.resolve_run_folder("smollm2-135m") == "smollm2-135m"



def test_a_second_build_on_a_complete_split_is_told_the_truth(tmp_path, tiny_model_dir):
    """Two builds at once on a split that is already complete: the second used to hear that
    'another build is writing'; nothing is being written."""
    from adaspec.config import build_config
    from cache_tools import store
    from cache_tools.errors import CacheError

    cfg = build_config({
        "models": {"target": str(tiny_model_dir)},
        "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 3, "max_length": 256},
        "cache": {"cache": str(tmp_path / "cache"), "draws": 4}})
    build.build_stage(cfg, "target", progress=False)
    with store.build_lock(cfg.cache.cache, "gsm8k", "train"):  # the other build, checking
        with pytest.raises(CacheError, match="already complete"):
            build.build_stage(cfg, "target", progress=False)
