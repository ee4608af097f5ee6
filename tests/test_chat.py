"""Task chat: label masks against hand-written renderings, turn-boundary truncation, and every
malformed row as one line naming its file and line."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import CHAT_FIXTURES, TINY_CHAT_TEMPLATE, make_tiny_tokenizer

from adaspec import models, tasks
from adaspec.errors import UserError

SHAPES = {"messages": CHAT_FIXTURES / "conversations.jsonl",
          "conversations": CHAT_FIXTURES / "sharegpt.json"}
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol_tokenizer():
    return models.load_tokenizer(models.DEFAULT_ALIAS)


@pytest.fixture(scope="module")
def tiny_chat_tokenizer():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _turns(row: dict) -> list[tuple[str, str]]:
    """(role, content) of a fixture row in either shape, roles in OpenAI's names."""
    if "messages" in row:
        return [(t["role"], t["content"]) for t in row["messages"]]
    names = {"system": "system", "human": "user", "gpt": "assistant"}
    return [(names[t["from"]], t["value"]) for t in row["conversations"]]


def _chatml_segments(turns) -> list[tuple[str, bool]]:
    """SmolLM2's ChatML rendering written out by hand: (text, labelled) pieces."""
    segments = []
    if turns[0][0] != "system":  # the template adds its default system turn
        segments.append((f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n", False))
    for role, content in turns:
        if role == "assistant":
            segments += [("<|im_start|>assistant\n", False), (content + "<|im_end|>", True),
                         ("\n", False)]
        else:
            segments.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
    return segments[:-1]  # the sequence ends with the last assistant turn's end-of-turn token


def _tiny_segments(turns) -> list[tuple[str, bool]]:
    """TINY_CHAT_TEMPLATE written out by hand."""
    segments = []
    for role, content in turns:
        if role == "assistant":
            segments += [("<assistant>", False), (content + "<|endoftext|>", True),
                         ("\n", False)]
        else:
            segments.append((f"<{role}>{content}<|endoftext|>\n", False))
    return segments[:-1]


def _hand_tokens(tokenizer, segments) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, labelled in segments:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if labelled else [-100] * len(piece)
    # the pieces meet at special tokens or punctuation: tokenized apart they are the whole's ids
    whole = "".join(text for text, _ in segments)
    assert ids == tokenizer(whole, add_special_tokens=False).input_ids
    return ids, labels


@pytest.mark.parametrize("template", ["smollm2", "tiny"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("row_index", [0, 1], ids=["with-system", "without-system"])
def test_labels_are_every_assistant_turn_and_its_end_of_turn(
        template, shape, row_index, smol_tokenizer, tiny_chat_tokenizer):
    tokenizer, segments_of = ((smol_tokenizer, _chatml_segments) if template == "smollm2"
                              else (tiny_chat_tokenizer, _tiny_segments))
    path = SHAPES[shape]
    example = tasks.load_examples("chat", "all", path)[row_index]
    rows = ([json.loads(line) for line in path.read_text().splitlines()] if path.suffix == ".jsonl"
            else json.loads(path.read_text()))
    turns = _turns(rows[row_index])
    assert (turns[0][0] == "system") == (row_index == 0)
    assert sum(role == "assistant" for role, _ in turns) >= 2
    ids, labels = _hand_tokens(tokenizer, segments_of(turns))

    tokenized = tasks.tokenize_example(example, tokenizer, max_length=4096)
    assert tokenized.input_ids == ids
    assert tokenized.labels == labels
    # the cache keeps the row as it was trained on: here the whole row, in its own shape
    assert json.loads(tokenized.text) == rows[row_index]


def test_the_prompt_is_the_conversation_up_to_its_last_assistant_turn(tiny_chat_tokenizer):
    example = tasks.load_examples("chat", "all", SHAPES["messages"])[1]
    turns = example.conversation.turns
    text = "".join(f"<{t.role}>{t.content}<|endoftext|>\n" for t in turns[:-1]) + "<assistant>"
    expected = tiny_chat_tokenizer(text, add_special_tokens=False).input_ids
    assert tasks.prompt_ids(example, tiny_chat_tokenizer) == expected
    assert tasks.prompt_ids(example, tiny_chat_tokenizer, budget=7) == expected[-7:]
    assert example.response == turns[-1].content


def _assistant_ends(labels: list[int]) -> list[int]:
    """The position after each labelled run."""
    return [i + 1 for i in range(len(labels))
            if labels[i] != -100 and (i + 1 == len(labels) or labels[i + 1] == -100)]


def test_truncation_keeps_whole_turns(tiny_chat_tokenizer):
    example = tasks.load_examples("chat", "all", SHAPES["messages"])[1]  # three assistant turns
    whole = tasks.tokenize_example(example, tiny_chat_tokenizer, max_length=4096)
    ends = _assistant_ends(whole.labels)
    assert len(ends) == 3
    eos = tiny_chat_tokenizer.eos_token_id
    for max_length, kept in [(ends[1], 2), (ends[2] - 1, 2), (ends[1] - 1, 1), (ends[0], 1)]:
        notes = Counter()
        cut = tasks.tokenize_examples([example], tiny_chat_tokenizer, max_length, notes=notes)[0]
        assert cut.input_ids == whole.input_ids[: ends[kept - 1]]  # ends on a whole turn
        assert cut.labels == whole.labels[: ends[kept - 1]]
        assert cut.input_ids[-1] == eos
        assert notes == Counter({"turns": 1})
        assert len(json.loads(cut.text)["messages"]) == example.conversation.turns.index(
            [t for t in example.conversation.turns if t.role == "assistant"][kept - 1]) + 1

def test_a_conversation_whose_first_answer_does_not_fit_is_skipped_and_counted(
        tmp_path, tiny_chat_tokenizer):
    short = tmp_path / "short.jsonl"
    short.write_text(GOOD + "\n")
    examples = tasks.load_examples("chat", "all", [SHAPES["messages"], short])
    long, short_example = examples[1], examples[-1]
    first_end = _assistant_ends(tasks.tokenize_example(long, tiny_chat_tokenizer, 4096).labels)[0]
    notes = Counter()
    kept = tasks.tokenize_examples([long, short_example], tiny_chat_tokenizer, first_end - 1,
                                   notes=notes)
    assert [k.source_index for k in kept] == [short_example.source_index]
    assert notes == Counter({"too_long": 1})


def test_user_turns_after_the_last_answer_are_left_out(tmp_path, tiny_chat_tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And then?"}]}) + "\n")
    example = tasks.load_examples("chat", "all", path)[0]
    assert [t.role for t in example.conversation.turns] == ["user", "assistant"]
    tokenized = tasks.tokenize_example(example, tiny_chat_tokenizer)
    assert tokenized.input_ids[-1] == tiny_chat_tokenizer.eos_token_id


def test_splits_are_carved_90_5_5_and_seeded():
    rows = tasks.load_examples("chat", "all", SHAPES["messages"])
    parts = {split: [e.source_index for e in tasks.load_examples("chat", split,
                                                                 SHAPES["messages"])]
             for split in ("train", "validation", "test")}
    assert sorted(sum(parts.values(), [])) == [e.source_index for e in rows]
    assert len(parts["test"]) == len(parts["validation"]) == len(rows) // 20
    other = [e.source_index for e in tasks.load_examples("chat", "test", SHAPES["messages"],
                                                         seed=1)]
    assert other != parts["test"]


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]})


def _row(*turns, key="messages") -> str:
    fields = ("role", "content") if key == "messages" else ("from", "value")
    return json.dumps({key: [dict(zip(fields, turn, strict=True)) for turn in turns]})


BAD_ROWS = {
    "unknown role": (_row(("narrator", "Once"), ("assistant", "upon")),
                     "turn 1 has role 'narrator'; use one of system, user, assistant"),
    "unknown ShareGPT role": (_row(("human", "Hi"), ("bot", "Hello"), key="conversations"),
                              "turn 2 has from 'bot'; use one of system, human, gpt"),
    "missing role": (json.dumps({"messages": [{"content": "Hi"}]}), "turn 1 has role missing"),
    "role not text": (json.dumps({"messages": [{"role": ["user"], "content": "Hi"}]}),
                      r"turn 1 has role \['user'\]; use one of"),
    "empty content": (_row(("user", "Hi"), ("assistant", "  ")),
                      r"turn 2 \(assistant\) is empty"),
    "non-string content": (json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"}]}),
        r"turn 1 \(user\) 'content' should be text, got list"),
    "two assistant turns": (_row(("user", "Hi"), ("assistant", "Hello"), ("assistant", "Again")),
                            "turns 2 and 3 are both assistant turns"),
    "two user turns": (_row(("user", "Hi"), ("user", "Hey"), ("assistant", "Hello")),
                       "turns 1 and 2 are both user turns"),
    "only a user turn": (_row(("user", "Hi")), "no assistant turn"),
    "answer first": (_row(("assistant", "Hello"), ("user", "Hi")),
                     "turn 1 is an assistant turn with no user turn before it"),
    "late system turn": (_row(("user", "Hi"), ("system", "Be brief"), ("assistant", "Hello")),
                         "turn 2 is a system turn"),
    "no turns": (json.dumps({"messages": []}), "'messages' should be a non-empty list"),
    "both shapes": (json.dumps({"messages": [], "conversations": []}), "this row has both"),
    "other task's row": (json.dumps({"instruction": "x", "output": "y"}), "this row has neither"),
    "turn not an object": (json.dumps({"messages": ["Hi"]}), "turn 1 should be an object"),
    "invalid JSON": ('{"messages": [', "invalid JSON"),
    "not UTF-8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_file_and_line(case, tmp_path):
    bad, message = BAD_ROWS[case]
    path = tmp_path / "chat.jsonl"
    bad = bad if isinstance(bad, bytes) else bad.encode()
    path.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + bad + b"\n")
    with pytest.raises(UserError, match=message) as caught:
        tasks.load_examples("chat", "train", path)
    text = str(caught.value)
    assert text.startswith("chat.jsonl line 3") and "\n" not in text


def test_a_bad_item_of_a_json_list_is_named(tmp_path):
    path = tmp_path / "chat.json"
    rows = [json.loads(GOOD), json.loads(BAD_ROWS["unknown role"][0])]
    path.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"^chat.json item 1: turn 1 has role 'narrator'"):
        tasks.load_examples("chat", "train", path)


def test_non_utf8_past_the_first_block_names_its_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes((GOOD + "\n").encode() * 3000 + b'{"messages": "\xff"}\n')
    with pytest.raises(UserError, match=r"^chat.jsonl line 3001 is not UTF-8"):
        tasks.load_examples("chat", "train", path)


def test_chat_needs_files_and_a_chat_template(tmp_path):
    with pytest.raises(UserError, match="reads your own files; pass --data-files"):
        tasks.load_examples("chat", "train")
    example = tasks.load_examples("chat", "all", SHAPES["messages"])[0]
    with pytest.raises(UserError, match="has none; use a chat model"):
        tasks.tokenize_example(example, make_tiny_tokenizer())


def test_a_template_that_refuses_a_row_is_one_line(tiny_chat_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_chat_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['content'] == 'Hi' %}"
                               "{{ raise_exception('no greetings') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    path = SHAPES["messages"]
    example = tasks.load_examples("chat", "all", path)[0]
    refused = example.conversation.__class__(
        (tasks.Turn("user", "Hi"), tasks.Turn("assistant", "Hello")), "{}", "messages",
        "c.jsonl line 9")
    with pytest.raises(UserError, match=r"^c.jsonl line 9: the chat template refused this "
                                        r"conversation \(no greetings\)$"):
        tasks.tokenize_example(example.__class__("", "Hello", 0, conversation=refused),
                               tokenizer)


def test_a_template_without_a_generation_prompt_is_refused(tiny_chat_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_chat_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                               "<|endoftext|>{% endfor %}")
    example = tasks.load_examples("chat", "all", SHAPES["messages"])[1]
    with pytest.raises(UserError, match="with text before its content"):
        tasks.tokenize_example(example, tokenizer)


def test_preview_brackets_each_assistant_turn(tiny_chat_tokenizer):
    text = tasks.preview("chat", tiny_chat_tokenizer, "all", SHAPES["conversations"], limit=1,
                         max_length=4096)
    row = json.loads(SHAPES["conversations"].read_text())[0]
    answers = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
    assert "chat_template on" in text.splitlines()[0]
    body = text.split("--- conversation ([[labels]]) ---\n")[1]
    assert body.count("[[") == len(answers)
    for answer in answers:
        assert f"<assistant>[[{answer}<|endoftext|>]]" in body
