"""Acceptance three ways on tiny models: offline bounds contain the exact teacher-forced value."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import REPO, make_tiny_model

from adaspec.build import build_stage
from adaspec.config import build_config
from adaspec.evaluate import evaluate

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    base = tmp_path_factory.mktemp("eval")
    draft_dir = base / "draft"
    make_tiny_model(len(tiny_tokenizer), n_layers=1, seed=11).save_pretrained(draft_dir)
    tiny_tokenizer.save_pretrained(draft_dir)
    values = {
        "models": {"target": str(tiny_model_dir)},
        "data": {"task": "gsm8k", "split": "test", "data_files": str(GSM8K), "limit": 6,
                 "max_length": 512},
        "cache": {"cache": str(base / "cache"), "topk": 16, "shard_rows": 512,
                  "chunk_rows": 256, "sparse": "topk", "value_encoding": "float16"},
    }
    cfg = build_config(values)
    build_stage(cfg, "target", progress=False)
    return cfg, draft_dir


def test_offline_bounds_contain_exact_on_the_same_tokens(setup):
    cfg, draft_dir = setup
    [result] = evaluate(cfg, [str(draft_dir)], ("offline", "exact"), progress=False)
    off, exact = result["offline"], result["exact"]
    assert off["label_tokens"] == exact["label_tokens"] > 100
    assert off["expected_acceptance_lower"] <= exact["expected_acceptance"] + 1e-4
    assert exact["expected_acceptance"] <= off["expected_acceptance_upper"] + 1e-4
    assert off["expected_acceptance_upper"] - off["expected_acceptance_lower"] > 0  # K < V
    # The cached top-1 is the target's argmax (up to float16 ties on a handful of tokens).
    assert abs(off["greedy_agreement"] - exact["greedy_agreement"]) < 0.02


def test_offline_bounds_from_a_sampled_cache_contain_exact(setup, tmp_path):
    cfg, draft_dir = setup
    sampled = dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, cache=str(tmp_path / "sampled"), sparse="sample", topk=16))
    build_stage(sampled, "target", progress=False)
    [result] = evaluate(sampled, [str(draft_dir)], ("offline", "exact"), progress=False)
    off, exact = result["offline"], result["exact"]
    assert off["label_tokens"] == exact["label_tokens"] > 100
    assert off["expected_acceptance_lower"] <= exact["expected_acceptance"] + 1e-4
    assert exact["expected_acceptance"] <= off["expected_acceptance_upper"] + 1e-4
    # 16 draws hold fewer distinct tokens than the top 16: wider bounds, but not vacuous
    [topk] = evaluate(cfg, [str(draft_dir)], ("offline",), progress=False)
    width = off["expected_acceptance_upper"] - off["expected_acceptance_lower"]
    top_width = (topk["offline"]["expected_acceptance_upper"]
                 - topk["offline"]["expected_acceptance_lower"])
    assert top_width < width < 1.0


def test_speculative_reports_the_three_conventions(setup, tmp_path):
    cfg, draft_dir = setup
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "adaspec.cli.eval", "--draft", str(draft_dir),
           "--target", cfg.models.target, "--task", "gsm8k", "--data-files", str(GSM8K),
           "--split", "test", "--cache", cfg.cache.cache, "--modes", "speculative",
           "--prompts", "2", "--max-new-tokens", "12", "--gamma", "3", "--json", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    spec = result["speculative"]
    assert result["gamma"] == 3 and result["n_prompts"] == 2
    assert 0.0 <= spec["alpha_paper"] <= 1.0
    assert spec["accepted"] + spec["rejected"] <= spec["drafted"]
    assert 1.0 <= spec["mean_accepted_length"] <= 4.0
    assert spec["speculative_tokens_per_s"] > 0 and spec["target_tokens_per_s"] > 0
    assert "AdaSPEC paper" in done.stdout and "vLLM" in done.stdout


def test_bad_eval_arguments_are_one_line(setup):
    cfg, draft_dir = setup
    cmd = [sys.executable, "-m", "adaspec.cli.eval", "--draft", str(draft_dir), "--gamma", "0",
           "--task", "gsm8k", "--data-files", str(GSM8K), "--modes", "speculative"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--gamma" in done.stderr.strip().splitlines()[-1]
