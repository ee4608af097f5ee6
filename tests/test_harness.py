"""harness: the shared parts of benches and studies."""

from __future__ import annotations

import pytest

import harness


def test_task_data_names_a_real_tasks_file_and_refuses_what_is_not_there(tmp_path, monkeypatch):
    assert harness.task_data("arith") is None  # generated, no file
    monkeypatch.setattr(harness, "SHARED_DATA", tmp_path)
    with pytest.raises(SystemExit, match="gsm8k rows are not there"):
        harness.task_data("gsm8k")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    assert harness.task_data("gsm8k") == str(tmp_path / "gsm8k" / "train.jsonl")
    with pytest.raises(SystemExit, match="no data file for task 'chat'"):
        harness.task_data("chat")
