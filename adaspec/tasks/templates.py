"""Prompt templates: each task maps a source row to an `Example` (prompt text, response text).

Templates (`{...}` are row fields; every response is followed by `tokenizer.eos_token`):

- gsm8k (exactly the official AdaSPEC code):
  prompt   `{question}\\nAnswer the above question. First think step by step and then answer the
  final number.\\n`; response `{answer}` with "####" replaced by "The final answer is: ", so
  "#### 72" becomes "The final answer is:  72" (two spaces, as in the official code).
- arith: our own synthetic GSM-style word problems (see `arith.arith_row`), rendered exactly as
  gsm8k.
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

Summarization prompts carry the document's character span (`Example.document_span`) so that
tokenization can cut the document, not the summary, when a sequence is too long.

A row parser has the signature `(row, source_index, where) -> Example`; `where` names the row
('train.jsonl line 4') in the `UserError` raised for a missing or mistyped field.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass

from adaspec.errors import UserError

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

_ALPACA_NO_INPUT = {"", "noinput", "n/a", "none"}


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: role is 'system', 'user' or 'assistant' whatever the shape."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A multi-turn row (task chat, `chat`): its turns, and what writes them back in its shape."""

    turns: tuple[Turn, ...]
    row: str  # the source row as JSON: exported rows keep its other fields and turn keys
    key: str  # "messages" (OpenAI: role/content) or "conversations" (ShareGPT: from/value)
    where: str  # 'chat.jsonl line 4', for errors the chat template raises


@dataclass(frozen=True)
class Example:
    """One task row as text: the model is trained to continue `prompt` with `response` + EOS.

    A conversation (`conversation` set) is rendered by the tokenizer's chat template instead and
    labelled on every assistant turn; its `prompt` is empty and `response` its last assistant
    turn (what a quality score compares with)."""

    prompt: str  # text before the response, template applied
    response: str  # response text without the EOS token
    source_index: int  # row position in the source file(s) or hub splits (provenance)
    document_span: tuple[int, int] | None = None  # [start, end) of the cuttable document in prompt
    conversation: Conversation | None = None


RowParser = Callable[[dict, int, str], Example]  # (row, source_index, where) -> Example


def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: missing field '{name}'; add it or pass the right task's file")
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' should be text, got {type(value).__name__}")
    return value


def gsm8k_example(row: dict, source_index: int, where: str) -> Example:
    question = _text_field(row, "question", where)
    answer = _text_field(row, "answer", where)
    return Example(
        prompt=f"{question}{GSM8K_QUESTION_PROMPT}",
        response=answer.replace("####", GSM8K_ANSWER_PROMPT),
        source_index=source_index,
    )


def alpaca_example(row: dict, source_index: int, where: str) -> Example:
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


def mbpp_example(row: dict, source_index: int, where: str) -> Example:
    # the task_id is not in the text, but the split rule reads it: check it with the other fields
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


def cnn_dailymail_example(row: dict, source_index: int, where: str) -> Example:
    return _summary_example(row, source_index, where, CNN_DAILYMAIL_PROMPT, "article", "highlights")


def xsum_example(row: dict, source_index: int, where: str) -> Example:
    return _summary_example(row, source_index, where, XSUM_PROMPT, "document", "summary")
