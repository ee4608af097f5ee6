"""Splits: which rows of a task's source go to train, validation and test.

Each task record (`registry.Task`) carries a `SplitRule`, and every source (`sources`) asks that
rule for each row's split; a task that splits its own way brings its own rule and adds no branch
to the sources. The rules:

- `MBPP_TASK_ID_RANGES` (mbpp): always by task_id (11-510 test, 511-600 validation, 601-974
  train; 1-10 are the few-shot prompts, only in "all"), on the hub across all its splits.
- `CARVED_BLOCKS` (every other task): rows are taken in blocks of 20 and a permutation seeded by
  (seed, block) sends one row of each block to test and one to validation (5% each, the rest
  train). A row's split depends only on its index and the seed, so it never moves between
  splits. On the hub it keeps the native splits and carves only a split the hub lacks (gsm8k
  validation, alpaca validation and test) out of train.

"all" is every row in source order. Every split keeps source order.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adaspec.errors import UserError

SPLITS = ("train", "validation", "test", "all")

_SPLIT_BLOCK = 20  # one test and one validation row per block of 20: 5% each


@dataclass(frozen=True)
class SplitRule:
    """How a task assigns its rows to splits.

    `split_of(source_index, row, seed)` names the row's split ('train', 'validation', 'test'), or
    None for a row that is only in "all". `row` holds at least the fields in `fields`: a rule that
    reads none goes by position alone, and the hub then reads no column for it.
    """

    split_of: Callable[[int, Mapping[str, Any], int], str | None]
    fields: tuple[str, ...] = ()  # the row fields split_of reads
    # hub: take a split the hub has as it is and carve only missing splits out of train; False
    # applies the rule to the rows of every hub split alike
    keeps_native_splits: bool = True

    def keeps(self, split: str, source_index: int, row: Mapping[str, Any], seed: int) -> bool:
        """Whether the row belongs to `split`; "all" keeps every row."""
        return split == "all" or self.split_of(source_index, row, seed) == split


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=4096)
def _carved_slots(seed: int, block: int) -> tuple[int, int]:
    """(test, validation) offsets inside one block of _SPLIT_BLOCK rows."""
    test_slot, validation_slot = random.Random(f"adaspec-split:{seed}:{block}").sample(
        range(_SPLIT_BLOCK), 2
    )
    return test_slot, validation_slot


def carved_split(row_index: int, seed: int) -> str:
    """'test', 'validation' or 'train' for a row, from its index and the seed alone."""
    block, offset = divmod(row_index, _SPLIT_BLOCK)
    test_slot, validation_slot = _carved_slots(seed, block)
    if offset == test_slot:
        return "test"
    if offset == validation_slot:
        return "validation"
    return "train"


def mbpp_split(task_id: int) -> str | None:
    """The official MBPP split of a task id; None for the few-shot prompts 1-10."""
    if 11 <= task_id <= 510:
        return "test"
    if 511 <= task_id <= 600:
        return "validation"
    if 601 <= task_id:
        return "train"
    return None


def _carved_row(source_index: int, row: Mapping[str, Any], seed: int) -> str:
    return carved_split(source_index, seed)


def _mbpp_row(source_index: int, row: Mapping[str, Any], seed: int) -> str | None:
    # a local row's task_id may be text (CSV); the row parser has already checked it is an integer
    return mbpp_split(int(row["task_id"]))


CARVED_BLOCKS = SplitRule(_carved_row)
MBPP_TASK_ID_RANGES = SplitRule(_mbpp_row, fields=("task_id",), keeps_native_splits=False)
