"""Task registry: turn the paper's tasks into token sequences whose labels mark the response.

Each task maps a source row to an `Example` (prompt text, response text), and every example is
tokenized the way the official AdaSPEC code does it: tokenize `prompt + response + eos_token` and
the prompt alone, with the tokenizer's default special tokens, and label only the positions after
the prompt (-100 elsewhere), truncated to `max_length`.

Templates (`{...}` are row fields; every response is followed by `tokenizer.eos_token`):

- gsm8k (exactly the official AdaSPEC code):
  prompt   `{question}\\nAnswer the above question. First think step by step and then answer the
  final number.\\n`; response `{answer}` with "####" replaced by "The final answer is: ", so
  "#### 72" becomes "The final answer is:  72" (two spaces, as in the official code).
- arith: our own synthetic GSM-style word problems (see `arith_row`), rendered exactly as gsm8k.
- alpaca: the Stanford Alpaca prompts, plus a final newline so the response starts a new token
  (with the bare "### Response:" some tokenizers merge ":" with the first response word):
  with input    `Below is an instruction that describes a task, paired with an input that provides
  further context. Write a response that appropriately completes the request.\\n\\n### Instruction:
  \\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n`
  without input `Below is an instruction that describes a task. Write a response that appropriately
  completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n`
  -> `{output}`. An empty input or a placeholder ("Noinput", "<noinput>", "No input.", "N/A",
  "None", ...; the original data spells it many ways) counts as no input.
- mbpp (the MBPP paper's format): `You are an expert Python programmer, and here is your task:
  {text} Your code should pass these tests:\\n\\n{test_list joined by \\n}\\n` -> `{code}`.
  Windows line ends ("\\r\\n", in nearly every source row) become "\\n" in code and tests, since a
  model generates "\\n" at inference.
- cnn_dailymail: `Summarize the following news article in a few sentences.\\n\\nArticle:\\n{article}
  \\n\\nSummary:\\n` -> `{highlights}`.
- xsum: `Summarize the following article in one sentence.\\n\\nArticle:\\n{document}
  \\n\\nSummary:\\n` -> `{summary}`.

With `chat_template=True` the prompt becomes the tokenizer's chat template around one user turn
holding the prompt above (with the generation prompt); the response and EOS follow as before.

Truncation. Summarization prompts carry the document's character span (`Example.document_span`);
when prompt + response exceed `max_length` the document is cut at a token boundary (its start is
kept) until the whole response fits. Otherwise, and when even an empty document leaves no room,
the sequence is cut at `max_length` from the right, as in the official code. A sequence with no
label token left (the prompt alone fills `max_length`) is dropped by `tokenize_examples`.

Labels start after the longest common prefix of the prompt tokens and the full-text tokens: this
equals the prompt length whenever the prompt tokenizes as a prefix of the full text (every template
above ends in a newline for that), and otherwise keeps the merged boundary token in the labels
instead of masking the first response token.

Sources and splits. By default rows come from the Hugging Face hub; `data_files` reads local
.jsonl / .json (a list of objects) / .csv (with header) files instead, concatenated in the given
order. `source_index` is the row's position in the file(s), or for the hub in the native splits
concatenated in the order train, validation, test, then any other. Splits:
- mbpp: always by task_id (11-510 test, 511-600 validation, 601-974 train; 1-10 are the few-shot
  prompts, only in "all").
- hub: the native split; a split the hub lacks (gsm8k validation, alpaca validation and test) is
  carved out of train.
- local files, carved hub splits and arith: rows are taken in blocks of 20 and a permutation seeded
  by (seed, block) sends one row of each block to test and one to validation (5% each, the rest
  train). A row's split depends only on its index and the seed, so it never moves between splits.
"all" is every row in source order. Every split keeps source order; `limit` takes its first rows.
"""

from __future__ import annotations

import ast
import csv
import functools
import hashlib
import json
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adaspec.errors import UserError

SPLITS = ("train", "validation", "test", "all")
IGNORE_INDEX = -100

GSM8K_QUESTION_PROMPT = (
    "\nAnswer the above question. First think step by step and then answer the final number.\n"
)
GSM8K_ANSWER_PROMPT = "The final answer is: "
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}\n"
)
CNN_DAILYMAIL_PROMPT = (
    "Summarize the following news article in a few sentences.\n\nArticle:\n{document}\n\nSummary:\n"
)
XSUM_PROMPT = (
    "Summarize the following article in one sentence.\n\nArticle:\n{document}\n\nSummary:\n"
)

ARITH_DEFAULT_ROWS = 2000
_SPLIT_BLOCK = 20  # one test and one validation row per block of 20: 5% each
_ALPACA_NO_INPUT = {"", "noinput", "n/a", "none"}


@dataclass(frozen=True)
class Example:
    """One task row as text: the model is trained to continue `prompt` with `response` + EOS."""

    prompt: str  # text before the response, template applied
    response: str  # response text without the EOS token
    source_index: int  # row position in the source file(s) or hub splits (provenance)
    document_span: tuple[int, int] | None = None  # [start, end) of the cuttable document in prompt


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example; `labels` equal `input_ids` on response + EOS, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    source_index: int


# --- rows to examples ------------------------------------------------------------------------


def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: missing field '{name}'; add it or pass the right task's file")
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' should be text, got {type(value).__name__}")
    return value


def _gsm8k_example(row: dict, source_index: int, where: str) -> Example:
    question = _text_field(row, "question", where)
    answer = _text_field(row, "answer", where)
    return Example(
        prompt=f"{question}{GSM8K_QUESTION_PROMPT}",
        response=answer.replace("####", GSM8K_ANSWER_PROMPT),
        source_index=source_index,
    )


def _alpaca_example(row: dict, source_index: int, where: str) -> Example:
    instruction = _text_field(row, "instruction", where)
    output = _text_field(row, "output", where)
    task_input = row.get("input") or ""
    if not isinstance(task_input, str):
        raise UserError(f"{where}: field 'input' should be text, got {type(task_input).__name__}")
    placeholder = task_input.strip().strip("<>.").replace(" ", "").lower()
    if placeholder in _ALPACA_NO_INPUT:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    else:
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=task_input)
    return Example(prompt=prompt, response=output, source_index=source_index)


def _mbpp_task_id(row: dict, where: str) -> int:
    value = row.get("task_id")
    if value is None:
        raise UserError(f"{where}: missing field 'task_id'; add it or pass the right task's file")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: task_id {value!r} is not an integer") from None


def _mbpp_tests(row: dict, where: str) -> list[str]:
    tests = row.get("test_list")
    if tests is None:
        raise UserError(f"{where}: missing field 'test_list'; add it or pass the right task's file")
    if isinstance(tests, str):  # a CSV cell holds the list as its repr or as JSON
        try:
            tests = ast.literal_eval(tests)
        except (ValueError, SyntaxError):
            tests = tests.splitlines()
    if not isinstance(tests, list) or not all(isinstance(test, str) for test in tests):
        raise UserError(f"{where}: field 'test_list' should be a list of strings")
    return tests


def _mbpp_example(row: dict, source_index: int, where: str) -> Example:
    _mbpp_task_id(row, where)
    text = _text_field(row, "text", where)
    code = _text_field(row, "code", where)
    tests = "\n".join(_mbpp_tests(row, where))
    return Example(
        prompt=MBPP_PROMPT.format(text=text, tests=tests).replace("\r\n", "\n"),
        response=code.replace("\r\n", "\n"),
        source_index=source_index,
    )


def _summary_example(
    row: dict, source_index: int, where: str, template: str, document_field: str, summary_field: str
) -> Example:
    document = _text_field(row, document_field, where)
    summary = _text_field(row, summary_field, where)
    head, tail = template.split("{document}")
    return Example(
        prompt=head + document + tail,
        response=summary,
        source_index=source_index,
        document_span=(len(head), len(head) + len(document)),
    )


def _cnn_dailymail_example(row: dict, source_index: int, where: str) -> Example:
    return _summary_example(row, source_index, where, CNN_DAILYMAIL_PROMPT, "article", "highlights")


def _xsum_example(row: dict, source_index: int, where: str) -> Example:
    return _summary_example(row, source_index, where, XSUM_PROMPT, "document", "summary")


@dataclass(frozen=True)
class _Task:
    row_to_example: Callable[[dict, int, str], Example]
    template_version: str  # bump when the template or the truncation rule changes
    hub_id: str | None = None
    hub_config: str | None = None


_TASKS: dict[str, _Task] = {
    "gsm8k": _Task(_gsm8k_example, "gsm8k-1", "openai/gsm8k", "main"),
    "alpaca": _Task(_alpaca_example, "alpaca-1", "tatsu-lab/alpaca"),
    "mbpp": _Task(_mbpp_example, "mbpp-1", "google-research-datasets/mbpp", "full"),
    "cnn_dailymail": _Task(
        _cnn_dailymail_example, "cnn_dailymail-1", "abisee/cnn_dailymail", "3.0.0"
    ),
    "xsum": _Task(_xsum_example, "xsum-1", "EdinburghNLP/xsum"),
    "arith": _Task(_gsm8k_example, "arith-1"),
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def _task(name: str) -> _Task:
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return _TASKS[name]


def template_version(task: str) -> str:
    """Short version string of the task's template and truncation rule, for cache manifests."""
    return _task(task).template_version


# --- splits ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _carved_slots(seed: int, block: int) -> tuple[int, int]:
    """(test, validation) offsets inside one block of _SPLIT_BLOCK rows."""
    test_slot, validation_slot = random.Random(f"adaspec-split:{seed}:{block}").sample(
        range(_SPLIT_BLOCK), 2
    )
    return test_slot, validation_slot


def _carved_split(row_index: int, seed: int) -> str:
    """'test', 'validation' or 'train' for a row, from its index and the seed alone."""
    block, offset = divmod(row_index, _SPLIT_BLOCK)
    test_slot, validation_slot = _carved_slots(seed, block)
    if offset == test_slot:
        return "test"
    if offset == validation_slot:
        return "validation"
    return "train"


def _carved_indices(row_indices: Iterable[int], split: str, seed: int) -> list[int]:
    return [index for index in row_indices if _carved_split(index, seed) == split]


def _mbpp_split(task_id: int) -> str | None:
    """The official MBPP split of a task id; None for the few-shot prompts 1-10."""
    if 11 <= task_id <= 510:
        return "test"
    if 511 <= task_id <= 600:
        return "validation"
    if 601 <= task_id:
        return "train"
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


# --- local files -----------------------------------------------------------------------------


def _as_paths(data_files: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(data_files, str | Path):
        return [Path(data_files)]
    return [Path(path) for path in data_files]


def _read_rows(path: Path) -> list[tuple[Any, str]]:
    """Rows of one local file with where each row sits ('name line N' / 'name item N')."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}; check the --data-files path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        # utf-8-sig: a byte-order mark would otherwise hide the first line's (or column's) name
        with path.open(encoding="utf-8-sig") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((json.loads(line), f"{path.name} line {line_number}"))
                except json.JSONDecodeError as error:
                    raise UserError(
                        f"{path.name} line {line_number}: invalid JSON ({error.msg}); fix that line"
                    ) from None
        return rows
    if suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path.name} line {error.lineno}: invalid JSON ({error.msg}); fix the file"
            ) from None
        if not isinstance(items, list):
            raise UserError(
                f"{path.name}: expected a JSON list of objects, got {type(items).__name__}"
            )
        return [(item, f"{path.name} item {index}") for index, item in enumerate(items)]
    if suffix == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # news articles overflow the default
        rows = []
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            start_line = reader.line_num + 2  # the line after the header
            for row in reader:
                rows.append((row, f"{path.name} line {start_line}"))
                start_line = reader.line_num + 1
        return rows
    raise UserError(f"{path.name}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")


def _local_examples(task: str, split: str, paths: list[Path], seed: int) -> list[Example]:
    row_to_example = _task(task).row_to_example
    examples: list[Example] = []
    task_ids: list[int] = []
    for path in paths:
        for row, where in _read_rows(path):
            if not isinstance(row, dict):
                raise UserError(
                    f"{where}: expected an object with fields, got {type(row).__name__}"
                )
            examples.append(row_to_example(row, len(examples), where))
            if task == "mbpp":
                task_ids.append(_mbpp_task_id(row, where))
    if split == "all":
        return examples
    if task == "mbpp":
        return [
            ex
            for ex, task_id in zip(examples, task_ids, strict=True)
            if _mbpp_split(task_id) == split
        ]
    keep = set(_carved_indices(range(len(examples)), split, seed))
    return [example for example in examples if example.source_index in keep]


# --- hub -------------------------------------------------------------------------------------


def _hub_examples(task: str, split: str, seed: int, limit: int | None) -> list[Example]:
    spec = _task(task)
    try:
        import datasets

        dataset_dict = datasets.load_dataset(spec.hub_id, spec.hub_config)
    except Exception as error:  # offline, unknown id, missing config: same fix for a user
        raise UserError(
            f"could not load {task} from the Hugging Face hub ({spec.hub_id}: "
            f"{type(error).__name__}); the hub is unreachable, pass --data-files PATH instead"
        ) from None

    native = [name for name in ("train", "validation", "test") if name in dataset_dict]
    native += [name for name in dataset_dict if name not in native]
    offsets, total = {}, 0
    for name in native:
        offsets[name] = total
        total += len(dataset_dict[name])

    picked: list[tuple[str, int]] = []  # (native split, row index in it), in source order
    if split == "all":
        picked = [(name, i) for name in native for i in range(len(dataset_dict[name]))]
    elif task == "mbpp":
        picked = [
            (name, i)
            for name in native
            for i, task_id in enumerate(dataset_dict[name]["task_id"])
            if _mbpp_split(task_id) == split
        ]
    elif split in dataset_dict and split != "train":
        picked = [(split, i) for i in range(len(dataset_dict[split]))]
    else:
        if "train" not in dataset_dict:
            raise UserError(f"{spec.hub_id} has no train split to carve {split!r} from")

        def split_of_train_row(row_index: int) -> str:
            # a train row carved for a split the hub has natively stays in train
            carved = _carved_split(row_index, seed)
            return "train" if carved in dataset_dict else carved

        n_train = len(dataset_dict["train"])
        picked = [("train", i) for i in range(n_train) if split_of_train_row(i) == split]
    picked.sort(key=lambda item: offsets[item[0]] + item[1])
    if limit is not None:
        picked = picked[:limit]

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


# --- arith: synthetic GSM-style problems -----------------------------------------------------

_PEOPLE = (
    ("Maya", "she"),
    ("Liam", "he"),
    ("Aisha", "she"),
    ("Carlos", "he"),
    ("Noah", "he"),
    ("Priya", "she"),
    ("Tom", "he"),
    ("Elena", "she"),
    ("Kenji", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Grace", "she"),
    ("Mateo", "he"),
    ("Hana", "she"),
    ("Ivan", "he"),
)
_GOODS = ("notebooks", "apples", "pens", "muffins", "tickets", "candles", "comic books", "plants")
_BIG_GOODS = ("jacket", "bicycle", "lamp", "backpack", "guitar", "tent", "chair", "watch")
_SHAREABLES = ("stickers", "marbles", "cookies", "cards", "stamps", "shells", "beads")
_VEHICLES = ("train", "cyclist", "truck", "boat", "car", "bus")
_CROPS = ("tomatoes", "carrots", "sunflowers", "peppers", "beans", "roses")


def _person(rng: random.Random, avoid: str = "") -> tuple[str, str, str]:
    """(name, pronoun, reflexive) of someone not named `avoid`."""
    name, pronoun = rng.choice([person for person in _PEOPLE if person[0] != avoid])
    return name, pronoun, "herself" if pronoun == "she" else "himself"


def _arith_change(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    count, price, goods = rng.randint(2, 9), rng.randint(2, 15), rng.choice(_GOODS)
    cost = count * price
    bill = next(bill for bill in (20, 50, 100, 200) if bill > cost)
    change = bill - cost
    question = (
        f"{name} buys {count} {goods} at ${price} each and pays with a ${bill} bill. "
        f"How much change does {pronoun} get?"
    )
    answer = (
        f"The {goods} cost {count} x ${price} = $<<{count}*{price}={cost}>>{cost}.\n"
        f"{name} gets ${bill} - ${cost} = $<<{bill}-{cost}={change}>>{change} in change.\n"
        f"#### {change}"
    )
    return question, answer


def _arith_shopping_total(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    goods_a, goods_b = rng.sample(_GOODS, 2)
    count_a, price_a = rng.randint(2, 8), rng.randint(1, 12)
    count_b, price_b = rng.randint(2, 8), rng.randint(1, 12)
    cost_a, cost_b = count_a * price_a, count_b * price_b
    total = cost_a + cost_b
    question = (
        f"{name} buys {count_a} {goods_a} for ${price_a} each and {count_b} {goods_b} for "
        f"${price_b} each. How much does {pronoun} spend in total?"
    )
    answer = (
        f"The {goods_a} cost {count_a} x {price_a} = $<<{count_a}*{price_a}={cost_a}>>{cost_a}.\n"
        f"The {goods_b} cost {count_b} x {price_b} = $<<{count_b}*{price_b}={cost_b}>>{cost_b}.\n"
        f"{name} spends {cost_a} + {cost_b} = $<<{cost_a}+{cost_b}={total}>>{total}.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_distance(rng: random.Random) -> tuple[str, str]:
    vehicle = rng.choice(_VEHICLES)
    speed_a, hours_a = rng.randint(8, 70), rng.randint(1, 5)
    speed_b, hours_b = rng.randint(8, 70), rng.randint(1, 4)
    dist_a, dist_b = speed_a * hours_a, speed_b * hours_b
    total = dist_a + dist_b
    question = (
        f"A {vehicle} travels at {speed_a} miles per hour for {hours_a} hours and then at "
        f"{speed_b} miles per hour for {hours_b} hours. How many miles does it travel in total?"
    )
    answer = (
        f"First it goes {speed_a} x {hours_a} = <<{speed_a}*{hours_a}={dist_a}>>{dist_a} miles.\n"
        f"Then it goes {speed_b} x {hours_b} = <<{speed_b}*{hours_b}={dist_b}>>{dist_b} miles.\n"
        f"In total it travels {dist_a} + {dist_b} = <<{dist_a}+{dist_b}={total}>>{total} miles.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_trip_time(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    speed, hours, pause = 5 * rng.randint(4, 14), rng.randint(2, 9), 5 * rng.randint(1, 9)
    distance, driving = speed * hours, hours * 60
    total = driving + pause
    question = (
        f"{name} has to drive {distance} miles at {speed} miles per hour. "
        f"{pronoun.capitalize()} also stops for a {pause}-minute break. "
        f"How many minutes does the trip take?"
    )
    answer = (
        f"Driving takes {distance} / {speed} = <<{distance}/{speed}={hours}>>{hours} hours.\n"
        f"That is {hours} x 60 = <<{hours}*60={driving}>>{driving} minutes.\n"
        f"With the break it takes {driving} + {pause} = <<{driving}+{pause}={total}>>{total} "
        f"minutes.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_sharing(rng: random.Random) -> tuple[str, str]:
    name, pronoun, reflexive = _person(rng)
    friends, each, kept = rng.randint(2, 8), rng.randint(2, 15), rng.randint(1, 12)
    things = rng.choice(_SHAREABLES)
    rest = friends * each
    total = rest + kept
    question = (
        f"{name} has {total} {things}. {pronoun.capitalize()} keeps {kept} for {reflexive} and "
        f"shares the rest equally among {friends} friends. How many {things} does each friend get?"
    )
    answer = (
        f"{name} shares {total} - {kept} = <<{total}-{kept}={rest}>>{rest} {things}.\n"
        f"Each friend gets {rest} / {friends} = <<{rest}/{friends}={each}>>{each} {things}.\n"
        f"#### {each}"
    )
    return question, answer


def _arith_ages(rng: random.Random) -> tuple[str, str]:
    younger = _person(rng)[0]
    older = _person(rng, avoid=younger)[0]
    age, gap, years = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 15)
    older_age = age + gap
    younger_later, older_later = age + years, older_age + years
    total = younger_later + older_later
    question = (
        f"{younger} is {age} years old. {older} is {gap} years older than {younger}. "
        f"What will be the sum of their ages in {years} years?"
    )
    answer = (
        f"{older} is {age} + {gap} = <<{age}+{gap}={older_age}>>{older_age} years old.\n"
        f"In {years} years {younger} will be {age} + {years} = "
        f"<<{age}+{years}={younger_later}>>{younger_later} and {older} will be {older_age} + "
        f"{years} = <<{older_age}+{years}={older_later}>>{older_later}.\n"
        f"Together that is {younger_later} + {older_later} = "
        f"<<{younger_later}+{older_later}={total}>>{total}.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_wages(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    wage, hours, days = rng.randint(8, 30), rng.randint(2, 9), rng.randint(2, 7)
    daily = wage * hours
    total = daily * days
    question = (
        f"{name} earns ${wage} an hour. {pronoun.capitalize()} works {hours} hours a day for "
        f"{days} days. How much does {pronoun} earn?"
    )
    answer = (
        f"Each day {pronoun} earns {wage} x {hours} = $<<{wage}*{hours}={daily}>>{daily}.\n"
        f"In {days} days {pronoun} earns {daily} x {days} = $<<{daily}*{days}={total}>>{total}.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_discount(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    item = rng.choice(_BIG_GOODS)
    # a price in 20s and a percent in 5s make the discount a whole number
    price = 20 * rng.randint(1, 60)
    percent = rng.choice((5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75))
    discount = price * percent // 100
    sale = price - discount
    question = (
        f"{name} wants a {item} that costs ${price}. During a sale it is {percent}% off. "
        f"How much does {pronoun} pay for the {item} during the sale?"
    )
    answer = (
        f"The discount is {price} x {percent} / 100 = "
        f"$<<{price}*{percent}/100={discount}>>{discount}.\n"
        f"{name} pays {price} - {discount} = $<<{price}-{discount}={sale}>>{sale}.\n"
        f"#### {sale}"
    )
    return question, answer


def _arith_reading(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    per_day, days, left = rng.randint(5, 40), rng.randint(2, 9), rng.randint(3, 120)
    read = per_day * days
    total = read + left
    question = (
        f"{name} is reading a book with {total} pages. {pronoun.capitalize()} reads {per_day} "
        f"pages every day. How many pages are left after {days} days?"
    )
    answer = (
        f"In {days} days {pronoun} reads {per_day} x {days} = "
        f"<<{per_day}*{days}={read}>>{read} pages.\n"
        f"There are {total} - {read} = <<{total}-{read}={left}>>{left} pages left.\n"
        f"#### {left}"
    )
    return question, answer


def _arith_garden(rng: random.Random) -> tuple[str, str]:
    crop = rng.choice(_CROPS)
    rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
    planted = rows * per_row
    lost = rng.randint(1, planted // 3)
    left = planted - lost
    question = (
        f"A farmer plants {rows} rows of {crop} with {per_row} plants in each row. "
        f"{lost} of the plants do not survive. How many plants are left?"
    )
    answer = (
        f"The farmer plants {rows} x {per_row} = <<{rows}*{per_row}={planted}>>{planted} plants.\n"
        f"There are {planted} - {lost} = <<{planted}-{lost}={left}>>{left} plants left.\n"
        f"#### {left}"
    )
    return question, answer


_ARITH_TEMPLATES = (
    _arith_change,
    _arith_shopping_total,
    _arith_distance,
    _arith_trip_time,
    _arith_sharing,
    _arith_ages,
    _arith_wages,
    _arith_discount,
    _arith_reading,
    _arith_garden,
)


def arith_row(row_index: int, seed: int = 0) -> dict[str, str]:
    """Row `row_index` of the synthetic arith task: {'question', 'answer'} in gsm8k's format.

    A row depends only on (row_index, seed), so the stream can be read to any length.
    """
    rng = random.Random(f"adaspec-arith:{seed}:{row_index}")
    question, answer = rng.choice(_ARITH_TEMPLATES)(rng)
    return {"question": question, "answer": answer}


def _arith_examples(split: str, seed: int, limit: int | None) -> list[Example]:
    """The split's rows among the first ARITH_DEFAULT_ROWS, or its first `limit` rows."""
    examples: list[Example] = []
    row_index = 0
    while (row_index < ARITH_DEFAULT_ROWS) if limit is None else (len(examples) < limit):
        if split == "all" or _carved_split(row_index, seed) == split:
            where = f"arith row {row_index}"
            examples.append(_gsm8k_example(arith_row(row_index, seed), row_index, where))
        row_index += 1
    return examples


# --- loading ---------------------------------------------------------------------------------


def load_examples(
    task: str,
    split: str = "train",
    data_files: str | Path | Sequence[str | Path] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """The split's examples in source order, the first `limit` of them if given.

    `data_files` reads local .jsonl/.json/.csv files instead of the hub; `seed` picks which rows
    go to test and validation where the source has no such split (see the module docstring).
    """
    _task(task)
    _check_split(split)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}; drop --limit to take every row")
    if task == "arith":
        if data_files is not None:
            raise UserError("task 'arith' is generated, it reads no files; drop --data-files")
        examples = _arith_examples(split, seed, limit)
        source = "generated rows"
    elif data_files is None:
        examples = _hub_examples(task, split, seed, limit)
        source = "the hub"
    else:
        paths = _as_paths(data_files)
        if not paths:
            raise UserError(f"no data files given for {task}; pass --data-files PATH")
        examples = _local_examples(task, split, paths, seed)
        source = ", ".join(path.name for path in paths)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserError(
            f"{task} split {split!r} from {source} has no rows; use another split or a bigger file"
        )
    return examples


def data_files_hash(data_files: str | Path | Sequence[str | Path] | None) -> str | None:
    """sha256 hex digest over the bytes of the files in order (one file: its sha256sum); None
    for the hub."""
    if data_files is None:
        return None
    digest = hashlib.sha256()
    for path in _as_paths(data_files):
        if not path.is_file():
            raise UserError(f"data file not found: {path}; check the --data-files path")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --- tokenization ----------------------------------------------------------------------------


def render(example: Example, tokenizer: Any, chat_template: bool = False) -> tuple[str, str]:
    """(prompt_text, full_text) exactly as tokenized: full = prompt + response + eos_token."""
    eos = tokenizer.eos_token
    if eos is None:
        raise UserError("the tokenizer has no eos_token; use a tokenizer that defines one")
    prompt_text = example.prompt
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template; drop --chat-template")
        prompt_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return prompt_text, prompt_text + example.response + eos


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts)["input_ids"]]


def _labelled(
    prompt_ids: list[int], full_ids: list[int], source_index: int, max_length: int
) -> TokenizedExample:
    n_prompt = 0
    for prompt_id, full_id in zip(prompt_ids, full_ids, strict=False):
        if prompt_id != full_id:
            break
        n_prompt += 1
    full_ids = full_ids[:max_length]
    labels = [IGNORE_INDEX] * min(n_prompt, len(full_ids)) + full_ids[n_prompt:]
    return TokenizedExample(input_ids=full_ids, labels=labels, source_index=source_index)


def _document_prefixes(document: str, tokenizer: Any) -> Callable[[int], str]:
    """A function from n to the start of `document` covering its first n tokens."""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in encoding["offset_mapping"]]
        return lambda n_tokens: document[: ends[n_tokens - 1]] if n_tokens > 0 else ""
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    return lambda n_tokens: tokenizer.decode(ids[:n_tokens], clean_up_tokenization_spaces=False)


def _fit_document(
    example: Example, tokenizer: Any, max_length: int, chat_template: bool, full_length: int
) -> tuple[Example, bool]:
    """The example with its document cut so prompt + response fit; False if even none won't fit."""
    start, end = example.document_span
    document = example.prompt[start:end]
    n_document = len(tokenizer(document, add_special_tokens=False)["input_ids"])
    document_prefix = _document_prefixes(document, tokenizer)
    keep = n_document - (full_length - max_length)
    while True:
        keep = min(max(keep, 0), n_document)
        prefix = document_prefix(keep)
        cut = replace(
            example,
            prompt=example.prompt[:start] + prefix + example.prompt[end:],
            document_span=(start, start + len(prefix)),
        )
        length = len(_token_ids(tokenizer, [render(cut, tokenizer, chat_template)[1]])[0])
        if length <= max_length:
            return cut, True
        if keep == 0:
            return cut, False
        # token counts are nearly additive across the cut, so this converges in a step or two
        keep -= length - max_length


def _tokenize_with_note(
    example: Example, tokenizer: Any, max_length: int, chat_template: bool
) -> tuple[TokenizedExample, str]:
    """The tokenized example and how it was truncated: 'none', 'document' or 'right'."""
    prompt_text, full_text = render(example, tokenizer, chat_template)
    prompt_ids, full_ids = _token_ids(tokenizer, [prompt_text, full_text])
    return _truncated(example, tokenizer, max_length, chat_template, prompt_ids, full_ids)


def _truncated(
    example: Example,
    tokenizer: Any,
    max_length: int,
    chat_template: bool,
    prompt_ids: list[int],
    full_ids: list[int],
) -> tuple[TokenizedExample, str]:
    if len(full_ids) <= max_length:
        return _labelled(prompt_ids, full_ids, example.source_index, max_length), "none"
    note = "right"
    if example.document_span is not None:
        cut, fits = _fit_document(example, tokenizer, max_length, chat_template, len(full_ids))
        prompt_text, full_text = render(cut, tokenizer, chat_template)
        prompt_ids, full_ids = _token_ids(tokenizer, [prompt_text, full_text])
        note = "document" if fits else "document+right"
    return _labelled(prompt_ids, full_ids, example.source_index, max_length), note


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise UserError(f"max_length must be at least 1, got {max_length}; pass --max-length 512")


def tokenize_example(
    example: Example, tokenizer: Any, max_length: int = 512, chat_template: bool = False
) -> TokenizedExample:
    """Token ids and labels of one example; its labels may all be -100 if the prompt fills
    `max_length` (`tokenize_examples` drops such examples)."""
    _check_max_length(max_length)
    return _tokenize_with_note(example, tokenizer, max_length, chat_template)[0]


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int = 512,
    chat_template: bool = False,
) -> list[TokenizedExample]:
    """Tokenize many examples (one batched tokenizer call), dropping those with no label token."""
    _check_max_length(max_length)
    if not examples:
        return []
    texts = [render(example, tokenizer, chat_template) for example in examples]
    prompt_ids = _token_ids(tokenizer, [prompt for prompt, _ in texts])
    full_ids = _token_ids(tokenizer, [full for _, full in texts])
    tokenized = [
        _truncated(example, tokenizer, max_length, chat_template, prompt, full)[0]
        for example, prompt, full in zip(examples, prompt_ids, full_ids, strict=True)
    ]
    kept = [item for item in tokenized if any(label != IGNORE_INDEX for label in item.labels)]
    if not kept:
        raise UserError(
            f"no example keeps a response token within max_length={max_length}; raise --max-length"
        )
    return kept


def preview(
    task: str,
    tokenizer: Any,
    split: str = "train",
    data_files: str | Path | Sequence[str | Path] | None = None,
    limit: int = 3,
    max_length: int = 512,
    chat_template: bool = False,
    seed: int = 0,
) -> str:
    """Human-readable view of the first examples exactly as they will be trained on: the prompt
    and label text decoded from the tokens, token counts and the label span."""
    _check_max_length(max_length)
    examples = load_examples(task, split, data_files=data_files, limit=limit, seed=seed)
    lines = [
        f"{task} {split}: first {len(examples)} examples, template {template_version(task)}, "
        f"max_length {max_length}, chat_template {'on' if chat_template else 'off'}"
    ]
    for example in examples:
        tokenized, truncation = _tokenize_with_note(example, tokenizer, max_length, chat_template)
        label_positions = [i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX]
        n_prompt = len(tokenized.input_ids) - len(label_positions)
        lines.append("")
        lines.append(f"=== source_index {example.source_index} ===")
        summary = (
            f"tokens: {len(tokenized.input_ids)} total, {n_prompt} prompt, "
            f"{len(label_positions)} label"
        )
        if label_positions:
            summary += f"; label span {label_positions[0]}..{label_positions[-1]}"
        else:
            summary += "; DROPPED: no label token within max_length"
        if truncation != "none":
            summary += f"; truncated ({truncation})"
        lines.append(summary)
        prompt_ids = tokenized.input_ids[:n_prompt]
        label_ids = [tokenized.input_ids[i] for i in label_positions]
        decode = tokenizer.decode
        lines.append("--- prompt ---")
        lines.append(decode(prompt_ids, clean_up_tokenization_spaces=False))
        lines.append("--- response (labels) ---")
        lines.append(decode(label_ids, clean_up_tokenization_spaces=False))
    return "\n".join(lines)
