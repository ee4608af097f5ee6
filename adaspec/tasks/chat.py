"""Task chat: your own multi-turn conversations, rendered with the target's chat template.

A row is one conversation in either common shape (JSONL, or a JSON list of rows):

- OpenAI:   `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`
- ShareGPT: `{"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}`

An optional system turn comes first; then user and assistant turns alternate, starting with a
user turn, with at least one assistant turn. A turn that breaks this (an unknown role, content
that is not text or is empty, two turns of one role in a row) is a one-line error naming the row;
user turns after the last assistant turn carry nothing to learn and are left out.

Labels. Every assistant turn's content and the template's end-of-turn marker after it are
labelled, nothing else (system, user and template text are masked). The boundaries come from the
template's own rendering, whatever the template: the text before assistant turn i is the
rendering of the turns before it with the generation prompt, the text through it the rendering
of the turns up to it, and both must be prefixes of the whole conversation's rendering (else a
one-line error: such a template cannot be labelled turn by turn). Between them sits the turn's
content (as is, or stripped when the template strips it) and then its end-of-turn text, labelled
up to trailing whitespace ("Hi<|im_end|>" of "Hi<|im_end|>\\n"). A token is labelled when it
overlaps that span, so a token merged across the boundary is learned rather than hidden.

Rendered text is tokenized without the tokenizer's own special tokens: the template writes them.

Truncation keeps whole turns: a conversation longer than `max_length` tokens ends after the last
assistant turn (its end-of-turn marker included) that fits; one whose first assistant turn does
not fit is skipped, and the build counts both in the cache manifest.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import replace
from typing import Any

from adaspec.errors import UserError
from adaspec.tasks.templates import Conversation, Example, Turn

# the two shapes: the key holding the turns -> (role field, content field, role names)
SHAPES: dict[str, tuple[str, str, dict[str, str]]] = {
    "messages": ("role", "content",
                 {"system": "system", "user": "user", "assistant": "assistant"}),
    "conversations": ("from", "value",
                      {"system": "system", "human": "user", "gpt": "assistant"}),
}
IGNORE_INDEX = -100


# --- reading a row ---------------------------------------------------------------------------


def chat_example(row: dict, source_index: int, where: str) -> Example:
    """A conversation row in either shape -> an `Example` carrying its `Conversation`."""
    keys = [key for key in SHAPES if key in row]
    if len(keys) != 1:
        found = "both" if keys else "neither"
        raise UserError(f"{where}: a chat row holds its turns in 'messages' (OpenAI) or "
                        f"'conversations' (ShareGPT); this row has {found}")
    key = keys[0]
    role_field, content_field, names = SHAPES[key]
    raw = row[key]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: '{key}' should be a non-empty list of turns, got "
                        f"{type(raw).__name__ if raw != [] else 'an empty list'}")
    turns = []
    for number, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{where}: turn {number} should be an object with '{role_field}' and "
                            f"'{content_field}', got {type(item).__name__}")
        name = item.get(role_field)
        if not isinstance(name, str) or name not in names:
            shown = "missing" if name is None else repr(name)
            raise UserError(f"{where}: turn {number} has {role_field} {shown}; "
                            f"use one of {', '.join(names)}")
        role = names[name]
        content = item.get(content_field)
        if not isinstance(content, str):
            got = "missing" if content is None else type(content).__name__
            raise UserError(f"{where}: turn {number} ({name}) '{content_field}' should be text, "
                            f"got {got}")
        if not content.strip():
            raise UserError(f"{where}: turn {number} ({name}) is empty; fill it or drop the turn")
        turns.append(Turn(role, content))
    _check_order(turns, where)
    last = max(i for i, turn in enumerate(turns) if turn.role == "assistant")
    conversation = Conversation(tuple(turns[: last + 1]), json.dumps(row, ensure_ascii=False),
                                key, where)
    return Example(prompt="", response=turns[last].content, source_index=source_index,
                   conversation=conversation)


def _check_order(turns: list[Turn], where: str) -> None:
    """System first if at all, then user and assistant alternating from a user turn."""
    for number, turn in enumerate(turns, start=1):
        if turn.role == "system" and number > 1:
            raise UserError(f"{where}: turn {number} is a system turn; only the first turn may "
                            "be one")
    body = turns[1:] if turns[0].role == "system" else turns
    offset = len(turns) - len(body)
    if body and body[0].role != "user":
        raise UserError(f"{where}: turn {offset + 1} is an assistant turn with no user turn "
                        "before it; a conversation starts with a user turn (after any system)")
    for i in range(1, len(body)):
        if body[i].role == body[i - 1].role:
            raise UserError(f"{where}: turns {offset + i} and {offset + i + 1} are both "
                            f"{body[i].role} turns; merge them or put the other role between")
    if not any(turn.role == "assistant" for turn in body):
        raise UserError(f"{where}: no assistant turn, nothing to learn; add one or drop the row")


# --- rendering -------------------------------------------------------------------------------


def _messages(turns) -> list[dict]:
    return [{"role": turn.role, "content": turn.content} for turn in turns]


def render_turns(conversation: Conversation, turns, tokenizer: Any,
                 generation_prompt: bool) -> str:
    """`turns` rendered by the tokenizer's chat template (a one-line error when it has none or
    refuses the conversation)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("task chat renders conversations with the target tokenizer's chat "
                        "template and this tokenizer has none; use a chat model as the target")
    try:
        return tokenizer.apply_chat_template(_messages(turns), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raise_exception, a template error: the row is the cause
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{conversation.where}: the chat template refused this conversation "
                        f"({message})") from None


def label_spans(conversation: Conversation, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, one [start, end) character span per assistant turn: its
    content and end-of-turn marker), checked against the template's renderings of each prefix."""
    turns = conversation.turns
    full = render_turns(conversation, turns, tokenizer, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = render_turns(conversation, turns[:i], tokenizer, True)
        through = render_turns(conversation, turns[: i + 1], tokenizer, False)
        if not (full.startswith(before) and full.startswith(through)
                and len(before) < len(through)):
            raise UserError(f"{conversation.where}: the tokenizer's chat template does not render "
                            f"turn {i + 1} as a prefix of the whole conversation, so its labels "
                            "cannot be placed; use a template that renders turn by turn")
        segment = full[len(before) : len(through)]
        content = next((c for c in (turn.content, turn.content.strip())
                        if segment.startswith(c)), None)
        if content is None:
            raise UserError(f"{conversation.where}: the chat template writes turn {i + 1} "
                            "(assistant) with text before its content (no generation prompt?), "
                            "so its labels cannot be placed; use a chat template that has one")
        content_end = len(before) + len(content)
        marker = full[content_end : len(through)].rstrip()
        spans.append((len(before), content_end + len(marker)))
    return full, spans


def _token_spans(text: str, spans: list[tuple[int, int]], tokenizer: Any
                 ) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of `text`, one [first, stop) token range per character span: the tokens that
    overlap it)."""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        # token j covers [ends[j-1], ends[j]): its end offsets alone place it, whatever the
        # tokenizer trims from its start offsets
        ends = [end for _, end in encoding["offset_mapping"]]
        return ids, [(bisect.bisect_right(ends, start),
                      min(len(ids), bisect.bisect_left(ends, stop) + 1))
                     for start, stop in spans]
    ids = _ids(tokenizer, text)
    ranges = []
    for start, stop in spans:
        first = _common_prefix(_ids(tokenizer, text[:start]), ids)
        head = _ids(tokenizer, text[:stop])
        shared = _common_prefix(head, ids)
        ranges.append((first, min(len(ids), shared + (shared < len(head)))))
    return ids, ranges


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_conversation(example: Example, tokenizer: Any, max_length: int
                          ) -> tuple[list[int], list[int], Conversation | None, str]:
    """(input_ids, labels, the conversation as kept, note) of one conversation.

    note: 'none', 'turns' (cut after the last assistant turn that fits `max_length`) or
    'too_long' (its first assistant turn does not fit: no labels, conversation None).
    """
    conversation = example.conversation
    text, spans = label_spans(conversation, tokenizer)
    ids, ranges = _token_spans(text, spans, tokenizer)
    kept = [r for r in ranges if r[1] <= max_length]
    if not kept:
        return ids[:max_length], [IGNORE_INDEX] * min(len(ids), max_length), None, "too_long"
    ids = ids[: kept[-1][1]]
    labels = [IGNORE_INDEX] * len(ids)
    for first, stop in kept:
        labels[first:stop] = ids[first:stop]
    assistant_turns = [i for i, turn in enumerate(conversation.turns) if turn.role == "assistant"]
    last_turn = assistant_turns[len(kept) - 1]
    kept_conversation = replace(conversation, turns=conversation.turns[: last_turn + 1])
    return ids, labels, kept_conversation, "none" if len(kept) == len(ranges) else "turns"


def prompt_ids(example: Example, tokenizer: Any, budget: int | None = None) -> list[int]:
    """The conversation up to its last assistant turn, with the generation prompt, as decoding
    sees it: the ids of that rendering, keeping the last `budget`."""
    conversation = example.conversation
    turns = conversation.turns
    last = max(i for i, turn in enumerate(turns) if turn.role == "assistant")
    ids = _ids(tokenizer, render_turns(conversation, turns[:last], tokenizer, True))
    return ids[-budget:] if budget else ids


def generation_prompt_ids(conversation: Conversation, turn: int, tokenizer: Any) -> list[int]:
    """Ids of the turns before `turn` rendered with the generation prompt: what the assistant
    answers when it writes turn `turn` (0-based)."""
    return _ids(tokenizer, render_turns(conversation, conversation.turns[:turn], tokenizer, True))


def exported_row(conversation: Conversation) -> dict:
    """The conversation as a row of its own shape: the source row with its turns cut to the
    conversation's and each turn's text replaced by the conversation's (regenerated) text."""
    row = json.loads(conversation.row)
    _, content_field, _ = SHAPES[conversation.key]
    raw = row[conversation.key][: len(conversation.turns)]
    row[conversation.key] = [{**item, content_field: turn.content}
                             for item, turn in zip(raw, conversation.turns, strict=True)]
    return row


def with_assistant_turns(conversation: Conversation, replies: list[str]) -> Conversation:
    """The conversation with its first len(replies) assistant turns replaced by `replies`, cut
    after the last of them."""
    turns, n = [], 0
    for turn in conversation.turns:
        if turn.role == "assistant":
            if n == len(replies):
                break
            turn = Turn("assistant", replies[n])
            n += 1
        turns.append(turn)
    return replace(conversation, turns=tuple(turns))


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the EOS token and, when the template closes a turn
    with one token of its own (Llama 3's <|eot_id|>, ChatML's <|im_end|>), that token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello")), "{}", "messages",
                         "the chat template's probe conversation")
    text, spans = label_spans(probe, tokenizer)
    start, stop = spans[0]
    marker = text[start + len("Hello") : stop]
    marker_ids = _ids(tokenizer, marker) if marker else []
    if len(marker_ids) == 1 and marker_ids[0] not in ids:
        ids.append(marker_ids[0])
    if not ids:
        raise UserError("the tokenizer has no eos_token and its chat template no one-token "
                        "end of turn; generation could not stop a turn")
    return ids
