"""The task registry: one `Task` record per task, holding everything that differs between tasks.

A record names the row parser (`templates`), the template version written to cache manifests,
the split rule (`splits`) and where rows come from: a hub dataset, a generator for a task made
offline (`arith`), or neither (`chat`: local files only). Loading, splitting and tokenizing read
only these fields, so adding a task is adding a record here (plus its parser, and a split rule
if none of `splits` fits) and never a branch on the task's name elsewhere. `TASK_NAMES` lists
the tasks in registry order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adaspec.errors import UserError
from adaspec.tasks.arith import ARITH_DEFAULT_ROWS, arith_row
from adaspec.tasks.chat import chat_example
from adaspec.tasks.splits import CARVED_BLOCKS, MBPP_TASK_ID_RANGES, SplitRule
from adaspec.tasks.templates import (
    RowParser,
    alpaca_example,
    cnn_dailymail_example,
    gsm8k_example,
    mbpp_example,
    xsum_example,
)


@dataclass(frozen=True)
class Task:
    """One task: how a row becomes an example, how rows split and where they come from."""

    name: str
    row_to_example: RowParser
    template_version: str  # bump when the template or the truncation rule changes
    split_rule: SplitRule
    hub_id: str | None = None
    hub_config: str | None = None
    # a generated task reads no files: row `i` is generate(i, seed), and without a limit a split
    # is drawn from the first `generated_rows` rows
    generate: Callable[[int, int], dict] | None = None
    generated_rows: int = 0
    # rows are conversations (`chat`): labelled on every assistant turn, regenerated turn by turn
    conversations: bool = False


_TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("gsm8k", gsm8k_example, "gsm8k-1", CARVED_BLOCKS, "openai/gsm8k", "main"),
        Task("alpaca", alpaca_example, "alpaca-1", CARVED_BLOCKS, "tatsu-lab/alpaca"),
        Task(
            "mbpp",
            mbpp_example,
            "mbpp-1",
            MBPP_TASK_ID_RANGES,
            "google-research-datasets/mbpp",
            "full",
        ),
        Task(
            "cnn_dailymail",
            cnn_dailymail_example,
            "cnn_dailymail-1",
            CARVED_BLOCKS,
            "abisee/cnn_dailymail",
            "3.0.0",
        ),
        Task("xsum", xsum_example, "xsum-1", CARVED_BLOCKS, "EdinburghNLP/xsum"),
        Task(
            "arith",
            gsm8k_example,  # arith rows are in gsm8k's format
            "arith-1",
            CARVED_BLOCKS,
            generate=arith_row,
            generated_rows=ARITH_DEFAULT_ROWS,
        ),
        # your own conversations, from --data-files only (no hub dataset)
        Task("chat", chat_example, "chat-1", CARVED_BLOCKS, conversations=True),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def lookup(name: str) -> Task:
    """The record of task `name`; a UserError listing the tasks for an unknown name."""
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return _TASKS[name]


def template_version(task: str) -> str:
    """Short version string of the task's template and truncation rule, for cache manifests."""
    return lookup(task).template_version
