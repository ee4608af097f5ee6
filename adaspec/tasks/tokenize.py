"""Tokenization: an `Example` becomes token ids whose labels mark the response.

Every example is tokenized the way the official AdaSPEC code does it: tokenize
`prompt + response + eos_token` and the prompt alone, with the tokenizer's default special tokens,
and label only the positions after the prompt (-100, `IGNORE_INDEX`, elsewhere), truncated to
`max_length`. `TokenizedExample.input_ids` and `.labels` are plain lists of equal length,
at most `max_length`.

A conversation (task chat) is rendered whole by the tokenizer's chat template and labelled on
every assistant turn instead, and cut at a turn boundary (`chat`).

With `chat_template=True` the prompt becomes the tokenizer's chat template around one user turn
holding the task prompt (with the generation prompt); the response and EOS follow as before.

Truncation. Summarization prompts carry the document's character span (`Example.document_span`);
when prompt + response exceed `max_length` the document is cut at a token boundary (its start is
kept) until the whole response fits. Otherwise, and when even an empty document leaves no room,
the sequence is cut at `max_length` from the right, as in the official code. A sequence with no
label token left (the prompt alone fills `max_length`) is dropped by `tokenize_examples`.

Labels start after the longest common prefix of the prompt tokens and the full-text tokens: this
equals the prompt length whenever the prompt tokenizes as a prefix of the full text (every template
ends in a newline for that), and otherwise keeps the merged boundary token in the labels instead
of masking the first response token.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from adaspec.errors import UserError
from adaspec.tasks import chat
from adaspec.tasks.sources import load_split
from adaspec.tasks.templates import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example; `labels` equal `input_ids` on response + EOS, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    source_index: int
    # a conversation (task chat): the row it was made from, as kept, in its shape (JSON)
    text: str | None = None


def render(example: Example, tokenizer: Any, chat_template: bool = False) -> tuple[str, str]:
    """(prompt_text, full_text) exactly as tokenized: full = prompt + response + eos_token.
    A conversation has no such pair (`chat` renders it)."""
    if example.conversation is not None:
        raise UserError("a conversation is rendered turn by turn; use tasks.tokenize_example")
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


def prompt_ids(example: Example, tokenizer: Any, chat_template: bool = False,
               budget: int | None = None) -> list[int]:
    """The token ids of an example's prompt as caches and decoding see it: rendered (with the
    chat template when asked), keeping the last `budget` ids (the end asks the question).
    A conversation's prompt is itself up to its last assistant turn (`chat.prompt_ids`)."""
    if example.conversation is not None:
        return chat.prompt_ids(example, tokenizer, budget)
    prompt_text, _ = render(example, tokenizer, chat_template)
    ids = tokenizer(prompt_text).input_ids
    return ids[-budget:] if budget else ids


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


def tokenize_with_note(
    example: Example, tokenizer: Any, max_length: int, chat_template: bool
) -> tuple[TokenizedExample, str]:
    """The tokenized example and how it was truncated: 'none', 'document', 'right' or
    'document+right' (even an empty document left no room); a conversation's: 'none', 'turns'
    or 'too_long' (`chat.tokenize_conversation`)."""
    if example.conversation is not None:
        return _conversation(example, tokenizer, max_length)
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


def _conversation(example: Example, tokenizer: Any, max_length: int
                  ) -> tuple[TokenizedExample, str]:
    ids, labels, kept, note = chat.tokenize_conversation(example, tokenizer, max_length)
    text = None if kept is None else json.dumps(chat.exported_row(kept), ensure_ascii=False)
    return TokenizedExample(ids, labels, example.source_index, text), note


def check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise UserError(f"max_length must be at least 1, got {max_length}; pass --max-length 512")


def tokenize_example(
    example: Example, tokenizer: Any, max_length: int = 512, chat_template: bool = False
) -> TokenizedExample:
    """Token ids and labels of one example; its labels may all be -100 if the prompt fills
    `max_length` (`tokenize_examples` drops such examples)."""
    check_max_length(max_length)
    return tokenize_with_note(example, tokenizer, max_length, chat_template)[0]


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int = 512,
    chat_template: bool = False,
    notes: Counter | None = None,
) -> list[TokenizedExample]:
    """Tokenize many examples (one batched tokenizer call), dropping those with no label token.
    `notes`, if given, counts how the conversations among them were truncated ('turns',
    'too_long': `tokenize_with_note`)."""
    check_max_length(max_length)
    if not examples:
        return []
    if examples[0].conversation is not None:  # a task's rows are all conversations or none
        tokenized = []
        for example in examples:
            item, note = _conversation(example, tokenizer, max_length)
            tokenized.append(item)
            if notes is not None and note != "none":
                notes[note] += 1
    else:
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


def tokenize_split(data, tokenizer: Any, notes: Counter | None = None
                   ) -> list[TokenizedExample]:
    """The split `data` (a config's data section) names, tokenized as a cache stores it
    (`max_length`, `chat_template` from the same section); `notes` as in `tokenize_examples`."""
    return tokenize_examples(load_split(data), tokenizer, data.max_length, data.chat_template,
                             notes)
