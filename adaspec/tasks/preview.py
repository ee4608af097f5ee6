"""Preview: the first examples of a split exactly as they will be trained on, for a person to read.

Backs `adaspec-cache preview`: each example is loaded and tokenized as the cache build does,
then its prompt and label tokens are decoded back to text with the token counts, the label span
and how it was truncated.
"""

from __future__ import annotations

from typing import Any

from adaspec.tasks.files import DataFiles
from adaspec.tasks.registry import lookup, template_version
from adaspec.tasks.sources import load_examples
from adaspec.tasks.templates import Example
from adaspec.tasks.tokenize import IGNORE_INDEX, check_max_length, tokenize_with_note


def preview(
    task: str,
    tokenizer: Any,
    split: str = "train",
    data_files: DataFiles | None = None,
    limit: int = 3,
    max_length: int = 512,
    chat_template: bool = False,
    seed: int = 0,
) -> str:
    """Human-readable view of the first examples exactly as they will be trained on: the prompt
    and label text decoded from the tokens, token counts and the label span."""
    check_max_length(max_length)
    examples = load_examples(task, split, data_files=data_files, limit=limit, seed=seed)
    lines = [
        f"{task} {split}: first {len(examples)} examples, template {template_version(task)}, "
        f"max_length {max_length}, chat_template "
        f"{'on' if chat_template or lookup(task).conversations else 'off'}"
    ]
    for example in examples:
        lines += _example_lines(example, tokenizer, max_length, chat_template)
    return "\n".join(lines)


def _example_lines(
    example: Example, tokenizer: Any, max_length: int, chat_template: bool
) -> list[str]:
    tokenized, truncation = tokenize_with_note(example, tokenizer, max_length, chat_template)
    if example.conversation is not None:
        return _conversation_lines(example, tokenized, truncation, tokenizer)
    label_positions = [i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX]
    n_prompt = len(tokenized.input_ids) - len(label_positions)
    summary = (
        f"tokens: {len(tokenized.input_ids)} total, {n_prompt} prompt, {len(label_positions)} label"
    )
    if label_positions:
        summary += f"; label span {label_positions[0]}..{label_positions[-1]}"
    else:
        summary += "; DROPPED: no label token within max_length"
    if truncation != "none":
        summary += f"; truncated ({truncation})"
    prompt_ids = tokenized.input_ids[:n_prompt]
    label_ids = [tokenized.input_ids[i] for i in label_positions]
    return [
        "",
        f"=== source_index {example.source_index} ===",
        summary,
        "--- prompt ---",
        tokenizer.decode(prompt_ids, clean_up_tokenization_spaces=False),
        "--- response (labels) ---",
        tokenizer.decode(label_ids, clean_up_tokenization_spaces=False),
    ]


def _conversation_lines(example: Example, tokenized, truncation: str, tokenizer: Any
                        ) -> list[str]:
    """A conversation decoded whole, each labelled run of tokens [[in brackets]]."""
    runs, start = [], 0  # (labelled, ids) runs in order
    for i in range(1, len(tokenized.labels) + 1):
        if i == len(tokenized.labels) or ((tokenized.labels[i] == IGNORE_INDEX)
                                          != (tokenized.labels[start] == IGNORE_INDEX)):
            runs.append((tokenized.labels[start] != IGNORE_INDEX, tokenized.input_ids[start:i]))
            start = i
    text = "".join(
        ("[[{}]]" if labelled else "{}").format(
            tokenizer.decode(ids, clean_up_tokenization_spaces=False))
        for labelled, ids in runs)
    n_labels = sum(len(ids) for labelled, ids in runs if labelled)
    summary = (f"tokens: {len(tokenized.input_ids)} total, {n_labels} label in "
               f"{sum(labelled for labelled, _ in runs)} assistant turns")
    if truncation == "too_long":
        summary += "; SKIPPED: its first assistant turn does not fit max_length"
    elif truncation != "none":
        summary += "; cut after the last assistant turn that fits"
    return ["", f"=== source_index {example.source_index} ===", summary,
            "--- conversation ([[labels]]) ---", text]
