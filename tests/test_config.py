"""Config: YAML + CLI overrides, unknown keys and bad values as one-line errors naming the flag."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from adaspec.config import Config, build_config, load_config
from adaspec.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: alpaca\n  limit: 10\ncache:\n  draws: 32\n")
    cfg = load_config(path, {"cache.draws": "16", "data.limit": None})
    assert isinstance(cfg, Config)
    assert cfg.data.task == "alpaca" and cfg.data.limit == 10
    assert cfg.cache.draws == 16  # the flag wins over the file; None flags are ignored
    assert cfg.cache.k == 16 and cfg.data.task == "alpaca"


@pytest.mark.parametrize("stage, lr", [("draft", 3e-4), ("ref", 3e-4), ("sft", 1e-5)])
def test_learning_rate_defaults_per_stage_and_the_run_records_it(stage, lr):
    from adaspec.train import resolve_config

    cfg = build_config({"train": {"stage": stage}})
    assert cfg.train.lr is None and cfg.train.learning_rate == lr
    assert resolve_config(cfg).train.lr == lr  # what config.yaml of the run holds
    given = build_config({"train": {"stage": stage, "lr": 5e-5}})
    assert resolve_config(given).train.lr == 5e-5


@pytest.mark.parametrize(
    "values, words",
    [
        ({"cache": {"draws": 0}}, ["cache.draws", "--draws", "0"]),
        ({"cache": {"topk": 0, "sparse": "topk"}}, ["cache.topk", "--topk", "0"]),
        ({"cache": {"topk": 8}}, ["cache.topk", "cache.draws", "--draws"]),  # renamed key
        ({"cache": {"sparse": "dense"}}, ["cache.sparse", "--sparse", "dense"]),
        ({"cache": {"shard_rows": 1000, "chunk_rows": 512}}, ["--shard-rows", "1000"]),
        ({"data": {"split": "dev"}}, ["data.split", "dev"]),
        ({"data": {"limit": "ten"}}, ["data.limit", "ten"]),
        ({"data": {"tsak": "gsm8k"}}, ["tsak", "unknown"]),
        ({"trian": {}}, ["trian", "unknown"]),
    ],
)
def test_bad_values_name_the_key(values, words):
    with pytest.raises(UserError) as err:
        build_config(values)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from adaspec.cli.cache import entry; entry()", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["build", "--model", "target", "--topk", "0"], "--topk"),
        (["preview", "--task", "nosuchtask", "--tokenizer", "x"], ""),
        (["info", "--cache", "/nonexistent/cache"], "no cache"),
        (["verify", "--cache", "/nonexistent/cache"], "no cache"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args, needle):
    result = _cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and needle in lines[0]


def test_cli_data_errors_are_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "answer": "a #### 1"}\n{"question": "q2"}\n')
    cases = [
        (["--data-files", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--data-files", str(bad), "--split", "all"], "answer"),
    ]
    for extra, needle in cases:
        result = _cli("preview", "--task", "gsm8k", "--tokenizer", str(tiny_model_dir), *extra)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert needle in lines[0]


def test_cli_preview_shows_label_spans(tiny_model_dir, shared_data):
    result = _cli("preview", "--task", "gsm8k", "--tokenizer", str(tiny_model_dir),
                  "--data-files", str(shared_data / "gsm8k" / "train.jsonl"), "--limit", "2")
    assert result.returncode == 0, result.stderr
    assert "The final answer is:" in result.stdout and "label" in result.stdout


def test_flags_and_help_come_from_the_config_classes():
    """Every config field a command exposes has a flag named by the class, helped by the
    field's docstring and listing its choices; the choices come from the implementing module."""
    import dataclasses

    from adaspec.cli import cache, eval, sweep, train
    from adaspec.cli.common import config_from_args
    from adaspec.config import SECTIONS
    from adaspec.config_fields import choices_of, field_docs, flag_of

    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
            choices_of(cls, f.name)  # resolves (or None)
    parser = train._parser()
    text = " ".join(parser.format_help().split())
    for name in ("k", "loss", "stage", "stream_memory_mb", "log_every"):
        flag = flag_of(SECTIONS["train"], name)
        assert flag in text, flag
    assert "Fraction of label tokens AdaSPEC keeps" in text
    assert "{fkl,rkl,tvd,jsd}" in text  # from losses.DIVERGENCES
    assert "--data-seed" in text and "--seed" in text  # one field name, two sections
    cfg = config_from_args(parser.parse_args(["--k", "0.7", "--loss", "rkl", "--data-seed", "3"]))
    assert (cfg.train.k, cfg.train.loss, cfg.data.seed) == (0.7, "rkl", 3)
    assert cfg.explicit == {"train.k", "train.loss", "data.seed"}
    sweep_cfg = config_from_args(sweep._parser().parse_args(["--k", "0.2,1", "--seeds", "0,1"]))
    assert sweep_cfg.sweep.k == (0.2, 1.0) and sweep_cfg.sweep.seeds == (0, 1)
    eval_cfg = config_from_args(eval._parser().parse_args(["--draft", "x", "--modes",
                                                           "offline,exact"]))
    assert eval_cfg.eval.modes == ("offline", "exact")
    build = cache._parser().parse_args(["build", "--model", "target", "--draws", "16"])
    assert config_from_args(build).cache.k == 16


def test_every_choice_list_is_the_implementations_list():
    """Settings declare their choices (Literal); each implementing module's tuple must agree."""
    from adaspec import config as c
    from adaspec import evaluate, generate, losses, models, selection, step, tasks, validation
    from adaspec.config_fields import choices_of
    from cache_tools import schema

    tied = {
        (c.ModelsConfig, "dtype"): models.DTYPES,
        (c.DataConfig, "task"): tasks.TASK_NAMES,
        (c.DataConfig, "split"): tasks.SPLITS,
        (c.CacheConfig, "sparse"): schema.SPARSE_MODES,
        (c.CacheConfig, "value_encoding"): schema.VALUE_ENCODINGS,
        (c.CacheConfig, "id_encoding"): schema.ID_ENCODINGS,
        (c.CacheConfig, "generator"): generate.GENERATORS,
        (c.TrainConfig, "stage"): step.STAGES,
        (c.TrainConfig, "loss"): losses.DIVERGENCES,
        (c.TrainConfig, "selection"): selection.RULES,
        (c.TrainConfig, "threshold"): selection.THRESHOLDS,
        (c.TrainConfig, "normalize"): selection.NORMALIZERS,
        (c.TrainConfig, "lr_schedule"): step.SCHEDULES,
        (c.TrainConfig, "mixed_precision"): step.MIXED_PRECISIONS,
        (c.TrainConfig, "report_to"): step.TRACKERS,
        (c.TrainConfig, "eval_split"): tasks.SPLITS,
        (c.TrainConfig, "best_metric"): validation.BEST_METRICS,
        (c.EvalConfig, "modes"): evaluate.MODES,
        (c.SweepConfig, "loss"): losses.DIVERGENCES,
        (c.SweepConfig, "eval_split"): tasks.SPLITS,
        (c.SweepConfig, "select_split"): tasks.SPLITS,
    }
    for (cls, name), implemented in tied.items():
        assert set(choices_of(cls, name)) == set(implemented), f"{cls.__name__}.{name}"
    # the cache stores one reference-loss array per divergence the losses implement
    assert set(schema.DIVERGENCES) == set(losses.DIVERGENCES)
    # and every field with choices is one of the tied ones
    declared = {(cls, f.name) for cls in c.SECTION_OF for f in dataclasses.fields(cls)
                if choices_of(cls, f.name) is not None}
    assert declared == set(tied)


def test_a_yaml_boolean_is_not_a_number(tmp_path):
    """`limit: true` used to become 1."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  limit: true\n")
    with pytest.raises(UserError, match="data.limit must be int"):
        load_config(path)


def test_no_progress_also_silences_the_gguf_bar():
    """transformers' GGUF de-quantisation bar is a plain tqdm its own switch does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    from adaspec.cli.common import run

    real = gguf.tqdm
    try:
        with pytest.raises(SystemExit):
            run(lambda argv: 0, ["--no-progress"])
        assert gguf.tqdm([1, 2]).disable
    finally:
        gguf.tqdm = real
