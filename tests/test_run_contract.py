"""The run folder's contract, as tests/test_cache_contract.py is the cache's: what a finished
`adaspec-train` run holds, read back only through `adaspec.runs` (the module that owns the names),
and that no other module spells those names itself."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import GSM8K, REPO, make_tiny_tokenizer, save_tiny_model
from transformers import AutoModelForCausalLM

from adaspec import runs
from adaspec.build import build_stage
from adaspec.config import RUN_SECTIONS, build_config
from adaspec.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_contract")
    tok = make_tiny_tokenizer()
    target = root / "target"
    save_tiny_model(target, tok, n_layers=2, seed=1)
    env = SimpleNamespace(root=root, cfg=lambda **t: build_config({
        "models": {"target": str(target), "draft": f"{target}@layers=1"},
        "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 6, "max_length": 512},
        "cache": {"cache": str(root / "cache"), "draws": 8, "shard_rows": 256, "chunk_rows": 128,
                  "batch_tokens": 1024},
        "train": {"batch_size": 2, "lr": 1e-3, "epochs": 2.0, "stage": "ref",
                  "out": str(root / "run"), "eval_split": "train", "eval_every": 2,
                  "keep_best": True, "checkpoint_every": 2, **t},
    }))
    build_stage(env.cfg(), "target", progress=False)
    return train(env.cfg(), progress=False)


def test_a_finished_run_holds_what_runs_says(run_dir):
    config = runs.read_config(run_dir)
    assert set(RUN_SECTIONS) <= set(config)
    schedule = runs.read_schedule(run_dir)
    assert schedule["optimizer_steps"] == 6 and schedule["batch_size"] == 2
    metrics = runs.read_metrics(run_dir)
    assert [m["step"] for m in runs.training_metrics(run_dir)] == list(range(1, 7))
    assert any("validation" in m for m in metrics) and any("plateau" in m for m in metrics)
    # the final and the best model load in plain transformers
    for folder in (runs.model_dir(run_dir), runs.best_dir(run_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, torch.nn.Module)
    best = runs.read_best(run_dir)
    assert best["metric"] == "expected_acceptance" and best["step"] in (2, 4, 6)
    assert runs.latest_checkpoint(run_dir).name == "step-00000006"
    assert runs.is_run_folder(run_dir) and not runs.is_run_folder(runs.model_dir(run_dir))
    assert runs.resolve_run_folder(str(run_dir)) == str(runs.model_dir(run_dir))
    assert yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text()) == config
    assert json.loads((runs.best_dir(run_dir) / runs.BEST_FILE).read_text()) == best


def test_no_module_spells_the_run_folder_names_but_runs():
    names = [runs.CONFIG_FILE, runs.METRICS_FILE, runs.PROGRESS_FILE, runs.BEST_FILE,
             runs.CHECKPOINTS_DIR, runs.LOGS_DIR]
    joined = [f'/ "{runs.MODEL_DIR}"', f'/ "{runs.BEST_DIR}"']
    pattern = re.compile("|".join([re.escape(f'"{n}"') for n in names]
                                  + [re.escape(j) for j in joined]))
    for path in [path for root in ("adaspec", "cache_tools", "harness", "bench", "studies")
                 for path in (REPO / root).rglob("*.py")]:
        if path.name == "runs.py":
            continue
        bad = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if pattern.search(line)]
        assert not bad, "\n".join(bad)
