"""Sources: read a task's rows from local files, the Hugging Face hub or its generator, and keep
the rows of one split as `Example`s.

By default rows come from the Hugging Face hub; `data_files` reads local .jsonl / .json (a list
of objects) / .csv (with header) files instead, concatenated in the given order (`files`).
`source_index` is the row's position in the file(s), or for the hub in the native splits
concatenated in the order train, validation, test, then any other; a generated task's row `i`
has source_index `i`. Which rows form a split is the task's `SplitRule` (`splits`):
- local files and generated rows: every row goes where the rule says.
- hub, a rule that keeps native splits (every task but mbpp): the native split; a split the hub
  lacks (gsm8k validation, alpaca validation and test) is carved out of train, and a train row
  carved for a split the hub has stays in train.
- hub, a rule that ignores native splits (mbpp's task_id ranges): the rule over every hub row.
"all" is every row in source order. Every split keeps source order; `limit` takes its first rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaspec.errors import UserError
from adaspec.tasks.files import DataFiles, as_paths, read_rows
from adaspec.tasks.registry import Task, lookup
from adaspec.tasks.splits import check_split
from adaspec.tasks.templates import Example

_NATIVE_ORDER = ("train", "validation", "test")  # hub splits come in this order, then any other


def load_examples(
    task: str,
    split: str = "train",
    data_files: DataFiles | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """The split's examples in source order, the first `limit` of them if given.

    `data_files` reads local .jsonl/.json/.csv files instead of the hub; `seed` picks which rows
    go to test and validation where the source has no such split (see the module docstring).
    """
    spec = lookup(task)
    check_split(split)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}; drop --limit to take every row")
    if spec.generate is not None:
        if data_files is not None:
            raise UserError(f"task {task!r} is generated, it reads no files; drop --data-files")
        examples = _generated_examples(spec, split, seed, limit)
        source = "generated rows"
    elif data_files is None:
        if spec.hub_id is None:
            raise UserError(f"task {task!r} reads your own files; pass --data-files PATH")
        examples = _hub_examples(spec, split, seed, limit)
        source = "the hub"
    else:
        paths = as_paths(data_files)
        if not paths:
            raise UserError(f"no data files given for {task}; pass --data-files PATH")
        examples = _local_examples(spec, split, paths, seed)
        source = ", ".join(path.name for path in paths)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserError(
            f"{task} split {split!r} from {source} has no rows; use another split or a bigger file"
        )
    return examples


# --- local files and generated rows ----------------------------------------------------------


def _local_examples(spec: Task, split: str, paths: list[Path], seed: int) -> list[Example]:
    # every row is parsed, whatever the split, so a malformed row fails every split alike
    examples: list[Example] = []
    rows: list[dict] = []
    for path in paths:
        for row, where in read_rows(path):
            if not isinstance(row, dict):
                raise UserError(
                    f"{where}: expected an object with fields, got {type(row).__name__}"
                )
            examples.append(spec.row_to_example(row, len(examples), where))
            rows.append(row)
    rule = spec.split_rule
    return [
        example
        for example, row in zip(examples, rows, strict=True)
        if rule.keeps(split, example.source_index, row, seed)
    ]


def _generated_examples(spec: Task, split: str, seed: int, limit: int | None) -> list[Example]:
    """The split's rows among the first `spec.generated_rows`, or its first `limit` rows."""
    examples: list[Example] = []
    row_index = 0
    while (row_index < spec.generated_rows) if limit is None else (len(examples) < limit):
        row = spec.generate(row_index, seed)
        if spec.split_rule.keeps(split, row_index, row, seed):
            where = f"{spec.name} row {row_index}"
            examples.append(spec.row_to_example(row, row_index, where))
        row_index += 1
    return examples


# --- hub -------------------------------------------------------------------------------------


def _load_hub(spec: Task) -> Any:
    try:
        import datasets

        return datasets.load_dataset(spec.hub_id, spec.hub_config)
    except Exception as error:  # offline, unknown id, missing config: same fix for a user
        raise UserError(
            f"could not load {spec.name} from the Hugging Face hub ({spec.hub_id}: "
            f"{type(error).__name__}); the hub is unreachable, pass --data-files PATH instead"
        ) from None


def _rule_rows(dataset: Any, fields: tuple[str, ...]) -> list[dict]:
    """Each row of a hub split with only the fields a split rule reads; no other column is read
    (a carved split of a news dataset would otherwise read every article)."""
    if not fields:
        return [{}] * len(dataset)
    columns = [dataset[field] for field in fields]
    return [dict(zip(fields, values, strict=True)) for values in zip(*columns, strict=True)]


def _hub_picks(
    spec: Task, dataset_dict: Any, native: list[str], offsets: dict[str, int], split: str, seed: int
) -> list[tuple[str, int]]:
    """(native split, row index in it) of every row of `split`, in no particular order."""
    rule = spec.split_rule
    if split == "all":
        return [(name, i) for name in native for i in range(len(dataset_dict[name]))]
    if not rule.keeps_native_splits:
        return [
            (name, i)
            for name in native
            for i, row in enumerate(_rule_rows(dataset_dict[name], rule.fields))
            if rule.split_of(offsets[name] + i, row, seed) == split
        ]
    if split in dataset_dict and split != "train":
        return [(split, i) for i in range(len(dataset_dict[split]))]
    if "train" not in dataset_dict:
        raise UserError(f"{spec.hub_id} has no train split to carve {split!r} from")

    def split_of_train_row(row_index: int, row: dict) -> str | None:
        # train comes first, so a train row's index is its source_index; a train row carved for a
        # split the hub has natively stays in train
        carved = rule.split_of(row_index, row, seed)
        return "train" if carved in dataset_dict else carved

    train_rows = _rule_rows(dataset_dict["train"], rule.fields)
    return [("train", i) for i, row in enumerate(train_rows) if split_of_train_row(i, row) == split]


def _hub_examples(spec: Task, split: str, seed: int, limit: int | None) -> list[Example]:
    dataset_dict = _load_hub(spec)
    native = [name for name in _NATIVE_ORDER if name in dataset_dict]
    native += [name for name in dataset_dict if name not in native]
    offsets, total = {}, 0
    for name in native:
        offsets[name] = total
        total += len(dataset_dict[name])

    picked = _hub_picks(spec, dataset_dict, native, offsets, split, seed)
    picked.sort(key=lambda item: offsets[item[0]] + item[1])  # source order
    if limit is not None:
        picked = picked[:limit]

    # only the picked rows are read, one select per native split
    examples = []
    for name in native:
        indices = [i for split_name, i in picked if split_name == name]
        if not indices:
            continue
        for i, row in zip(indices, dataset_dict[name].select(indices), strict=True):
            where = f"{spec.hub_id} {name} row {i}"
            examples.append(spec.row_to_example(dict(row), offsets[name] + i, where))
    examples.sort(key=lambda example: example.source_index)
    return examples


def load_split(data) -> list[Example]:
    """The examples of the split `data` (a config's data section: task, split, data_files,
    limit, seed) names, as every reader of a task's split loads them."""
    return load_examples(data.task, data.split, data.data_files, data.limit, data.seed)
