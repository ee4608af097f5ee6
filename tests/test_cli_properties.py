"""Property-style checks of every CLI (issue 20): every flag a CLI takes, fed the bad values of
its kind, answers with exit 2, one line on stderr and no traceback, before any work and without
writing anything.

The flags are read from the CLIs' own parsers, so a flag added later is covered without editing
this file: every float setting with nan, inf, -inf; every int setting with -1 (seeds included)
and 2**70; every file-path flag with a directory, a missing file and a binary (non-UTF-8) file;
output paths under a location that cannot be written (simulated: as root nothing is read-only).
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path

import pytest

from adaspec import config as c
from adaspec.cli import cache, eval, export, sweep, train
from adaspec.cli.common import run

MAINS = {"adaspec-cache": (cache.main, cache._parser), "adaspec-train": (train.main, train._parser),
         "adaspec-eval": (eval.main, eval._parser), "adaspec-sweep": (sweep.main, sweep._parser),
         "adaspec-export": (export.main, export._parser)}
# What each CLI needs besides the flag under test (nothing that would start work: a bad value
# must be refused before the missing pieces matter).
REQUIRED = {"adaspec-eval": ["--draft", "nowhere-draft"], "adaspec-export": ["nowhere-run"]}


def _config_flags(parser: argparse.ArgumentParser, prefix: tuple = ()):
    """(subcommand words, flag, section, key) of every flag that sets a config field."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _config_flags(sub, (*prefix, name))
        elif "." in action.dest and action.option_strings:
            section, key = action.dest.split(".", 1)
            yield prefix, action.option_strings[0], section, key


def _kind(section: str, key: str) -> type | None:
    hint = typing.get_type_hints(c.SECTIONS[section])[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if typing.get_origin(base) is tuple:
        base = typing.get_args(base)[0]
    return base if base in (int, float) else None


def _cases():
    cases = []
    for cli, (_, parser) in MAINS.items():
        for words, flag, section, key in _config_flags(parser()):
            kind = _kind(section, key)
            bad = {float: ["nan", "inf", "-inf"], int: ["-1", str(2**70)]}.get(kind, [])
            if kind is int and key in ("checkpoint_every", "eval_every", "warmup_steps"):
                bad = ["-1", str(2**70)]  # 0 is meaningful (off) for these
            needs = ["--model", "target"] if words == ("build",) else []
            for value in bad:
                cases.append((cli, [*words, *needs, flag, value], flag))
    return cases


CASES = _cases()


def _refused(capsys, cli: str, argv: list[str]) -> str:
    main = MAINS[cli][0]
    argv = [*argv, *REQUIRED.get(cli, [])]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    return lines[0]


def test_the_generated_cases_cover_every_cli():
    covered = {cli for cli, _, _ in CASES}
    assert covered >= {"adaspec-cache", "adaspec-train", "adaspec-eval", "adaspec-sweep"}
    assert len(CASES) > 100


@pytest.mark.parametrize("cli,argv,flag", CASES, ids=[f"{c_}:{' '.join(a)}" for c_, a, _ in CASES])
def test_every_numeric_flag_refuses_bad_values_in_one_line(tmp_path, monkeypatch, capsys, cli,
                                                          argv, flag):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    line = _refused(capsys, cli, argv)
    assert flag in line or argv[-1] in line, line
    assert list(tmp_path.iterdir()) == []


def _path_cases(tmp: Path):
    binary = tmp / "binary.jsonl"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    binary_yaml = tmp / "binary.yaml"
    binary_yaml.write_bytes(bytes(range(128, 256)) * 4)
    folder = tmp / "a-folder.jsonl"
    folder.mkdir()
    missing = tmp / "missing.jsonl"
    inputs = {"--data-files": [str(folder), str(missing), str(binary)],
              "--config": [str(folder), str(tmp / "missing.yaml"), str(binary_yaml)]}
    cases = []
    for cli, words in (("adaspec-cache", ["build", "--model", "target"]),
                       ("adaspec-cache", ["preview"]), ("adaspec-train", []),
                       ("adaspec-eval", []), ("adaspec-sweep", [])):
        for flag, values in inputs.items():
            for value in values:
                cases.append((cli, [*words, flag, value]))
    return cases


def test_every_input_file_flag_refuses_a_folder_a_missing_and_a_binary_file(tmp_path, capsys):
    for cli, argv in _path_cases(tmp_path):
        line = _refused(capsys, cli, [*argv, "--task", "gsm8k"])
        assert Path(argv[-1]).name in line, (argv, line)


def test_output_paths_that_cannot_be_written_are_refused_before_work(tmp_path, monkeypatch,
                                                                     capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    # --json naming a directory (it used to fail after the whole evaluation)
    line = _refused(capsys, "adaspec-eval", ["--json", str(folder)])
    assert "is a directory" in line
    # --out naming a file
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = _refused(capsys, "adaspec-train", ["--cache", str(tmp_path), "--out", str(a_file)])
    assert "is a file" in line
    # a location that cannot be written (root ignores permissions: the check is simulated)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode == os.W_OK
                        else real_access(p, mode, *a, **k))
    line = _refused(capsys, "adaspec-eval", ["--json", str(folder / "r.json")])
    assert "not writable" in line
