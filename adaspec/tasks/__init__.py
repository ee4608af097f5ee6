"""Tasks: turn the paper's tasks into token sequences whose labels mark the response.

Each task maps a source row to an `Example` (prompt text, response text), and every example is
tokenized the way the official AdaSPEC code does it: tokenize `prompt + response + eos_token` and
the prompt alone, with the tokenizer's default special tokens, and label only the positions after
the prompt (-100 elsewhere), truncated to `max_length`.

The package, one job per module (each module's docstring holds the details):
- `registry`: one `Task` record per task (row parser, template version, split rule, hub id or
  generator); `TASK_NAMES`, `template_version`.
- `templates`: the prompt templates, `Example` and the row parsers with their field checks.
- `splits`: `SPLITS` and the split rules (mbpp's task_id ranges, blocks of 20 carved by seed).
- `files`: reading local .jsonl / .json / .csv files, `data_files_hash`.
- `sources`: `load_examples`: rows from local files, the hub or a generator, one split of them;
  `load_split` for a config's data section.
- `arith`: the generator of the synthetic arith task, `arith_row`.
- `chat`: task chat: conversation rows in the OpenAI and ShareGPT shapes, their labels on every
  assistant turn from the chat template's rendering, turn-boundary truncation, export.
- `tokenize`: `render` (with the chat template), label masks, truncation, `tokenize_example(s)`,
  `tokenize_split`.
- `preview`: `preview`, the first examples decoded as they will be trained on.

Use the names below (`from adaspec import tasks; tasks.load_examples(...)`); the modules'
other names are the package's own.
"""

from adaspec.tasks import chat
from adaspec.tasks.arith import ARITH_DEFAULT_ROWS, arith_row
from adaspec.tasks.files import check_files, data_files_hash
from adaspec.tasks.preview import preview
from adaspec.tasks.registry import TASK_NAMES, lookup, template_version
from adaspec.tasks.sources import load_examples, load_split
from adaspec.tasks.splits import SPLITS
from adaspec.tasks.templates import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    CNN_DAILYMAIL_PROMPT,
    GSM8K_ANSWER_PROMPT,
    GSM8K_QUESTION_PROMPT,
    MBPP_PROMPT,
    XSUM_PROMPT,
    Conversation,
    Example,
    Turn,
)
from adaspec.tasks.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    prompt_ids,
    render,
    tokenize_example,
    tokenize_examples,
    tokenize_split,
)

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "ARITH_DEFAULT_ROWS",
    "CNN_DAILYMAIL_PROMPT",
    "GSM8K_ANSWER_PROMPT",
    "GSM8K_QUESTION_PROMPT",
    "IGNORE_INDEX",
    "MBPP_PROMPT",
    "SPLITS",
    "TASK_NAMES",
    "XSUM_PROMPT",
    "Conversation",
    "Example",
    "TokenizedExample",
    "Turn",
    "arith_row",
    "chat",
    "check_files",
    "data_files_hash",
    "load_examples",
    "load_split",
    "lookup",
    "preview",
    "prompt_ids",
    "render",
    "template_version",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_split",
]
