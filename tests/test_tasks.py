"""Task registry: templates, label masks, splits, truncation, arith and user errors on real rows."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import operator
import re

import pytest

from adaspec import tasks
from adaspec.errors import UserError
from adaspec.tasks import Example

FILES = {
    "gsm8k": "gsm8k/train.jsonl",
    "alpaca": "alpaca/alpaca_5000.json",
    "mbpp": "mbpp/mbpp.jsonl",
    "cnn_dailymail": "cnn_dailymail/cnn_dailymail_validation_subset.csv",
    "xsum": "xsum/xsum-1000.jsonl",
}
SINGLE_TURN = tuple(t for t in tasks.TASK_NAMES if t != "chat")  # chat: tests/test_chat.py
GSM8K_SHA256 = "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"  # SOURCES.md


def data_files(shared_data, task):
    return None if task == "arith" else shared_data / FILES[task]


def decode(tokenizer, ids):
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def label_ids(tokenized):
    return [
        i for i, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != -100
    ]


def test_task_names_and_template_versions():
    assert tasks.TASK_NAMES == ("gsm8k", "alpaca", "mbpp", "cnn_dailymail", "xsum", "arith",
                                "chat")
    versions = [tasks.template_version(task) for task in tasks.TASK_NAMES]
    assert all(isinstance(version, str) and version for version in versions)
    assert len(set(versions)) == len(versions)


@pytest.mark.parametrize("task", SINGLE_TURN)
def test_labels_cover_exactly_the_response(task, shared_data, tiny_tokenizer):
    examples = tasks.load_examples(task, "train", data_files(shared_data, task), limit=4)
    tokenized = tasks.tokenize_examples(examples, tiny_tokenizer, max_length=100_000)
    assert len(tokenized) == len(examples)
    for example, item in zip(examples, tokenized, strict=True):
        assert item.source_index == example.source_index
        assert len(item.labels) == len(item.input_ids)
        # -100 on a prefix, then labels equal the ids up to the end
        n_prompt = len(tiny_tokenizer(example.prompt)["input_ids"])
        assert item.labels[:n_prompt] == [-100] * n_prompt
        assert item.labels[n_prompt:] == item.input_ids[n_prompt:]
        assert decode(tiny_tokenizer, label_ids(item)) == example.response + "<|endoftext|>"
        assert item.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_gsm8k_matches_official_template_and_masking(shared_data, tiny_tokenizer):
    lines = (shared_data / FILES["gsm8k"]).read_text(encoding="utf-8").splitlines()[:5]
    rows = [json.loads(line) for line in lines]
    examples = tasks.load_examples("gsm8k", "all", shared_data / FILES["gsm8k"], limit=5)
    eos = tiny_tokenizer.eos_token
    for row, example in zip(rows, examples, strict=True):
        # a re-statement of SupervisedDataset in the official AdaSPEC utils.py
        source = row["question"] + (
            "\nAnswer the above question. First think step by step and then answer the final "
            "number.\n"
        )
        target = f"{row['answer']}{eos}".replace("####", "The final answer is: ")
        assert tasks.render(example, tiny_tokenizer) == (source, source + target)
        input_ids = tiny_tokenizer(source + target)["input_ids"]
        n_source = len(tiny_tokenizer(source)["input_ids"])
        labels = [-100] * n_source + input_ids[n_source:]
        tokenized = tasks.tokenize_example(example, tiny_tokenizer, max_length=2048)
        assert (tokenized.input_ids, tokenized.labels) == (input_ids, labels)
    assert examples[0].response.endswith("The final answer is:  72")


def test_mbpp_template_and_official_split_sizes(shared_data):
    path = shared_data / FILES["mbpp"]
    sizes = {split: len(tasks.load_examples("mbpp", split, path)) for split in tasks.SPLITS}
    assert sizes == {"train": 374, "validation": 90, "test": 500, "all": 974}
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[10])  # task_id 11, first test
    first_test = tasks.load_examples("mbpp", "test", path, limit=1)[0]
    assert first_test.source_index == 10 and row["task_id"] == 11
    tests = "\n".join(row["test_list"])
    assert first_test.prompt == (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n"
    )
    assert first_test.response == row["code"].replace("\r\n", "\n")
    assert "\r" not in first_test.response


def test_alpaca_templates_with_and_without_input(shared_data):
    path = shared_data / FILES["alpaca"]
    rows = json.loads(path.read_text(encoding="utf-8"))
    examples = tasks.load_examples("alpaca", "all", path)
    with_input = next(i for i, row in enumerate(rows) if row["input"].strip())
    assert examples[with_input].prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{rows[with_input]['instruction']}\n\n"
        f"### Input:\n{rows[with_input]['input']}\n\n### Response:\n"
    )
    for placeholder in ("", "Noinput", "<No input>", "No input.", "N/A"):
        index = next(i for i, row in enumerate(rows) if row["input"] == placeholder)
        assert examples[index].prompt == (
            "Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{rows[index]['instruction']}\n\n"
            "### Response:\n"
        )
        assert examples[index].response == rows[index]["output"]


@pytest.mark.parametrize("task", ["gsm8k", "cnn_dailymail", "alpaca"])
def test_local_splits_are_disjoint_cover_all_rows_and_deterministic(task, shared_data):
    path = shared_data / FILES[task]
    every_row = tasks.load_examples(task, "all", path)
    assert [example.source_index for example in every_row] == list(range(len(every_row)))
    indices = {
        split: [ex.source_index for ex in tasks.load_examples(task, split, path, seed=3)]
        for split in ("train", "validation", "test")
    }
    train, validation, test = (set(indices[s]) for s in ("train", "validation", "test"))
    assert not (train & validation or train & test or validation & test)
    assert train | validation | test == set(range(len(every_row)))
    assert abs(len(test) - len(every_row) / 20) <= 1
    assert abs(len(validation) - len(every_row) / 20) <= 1
    assert all(indices[s] == sorted(indices[s]) for s in indices)  # source order
    assert [ex.source_index for ex in tasks.load_examples(task, "test", path, seed=3)] == sorted(
        test
    )
    other_seed = {ex.source_index for ex in tasks.load_examples(task, "test", path, seed=4)}
    assert other_seed != test


def test_limit_takes_the_first_rows_of_the_split(shared_data):
    path = shared_data / FILES["xsum"]
    whole = tasks.load_examples("xsum", "validation", path)
    assert tasks.load_examples("xsum", "validation", path, limit=7) == whole[:7]


# the tiny tokenizer spends about a token per character: CNN highlights need more than 128
@pytest.mark.parametrize("task, max_length", [("xsum", 128), ("cnn_dailymail", 384)])
def test_document_truncation_keeps_the_whole_response(
    task, max_length, shared_data, tiny_tokenizer
):
    examples = tasks.load_examples(task, "all", shared_data / FILES[task], limit=40)
    # a long document whose response alone fits comfortably
    example = next(
        ex
        for ex in examples
        if len(tiny_tokenizer(ex.response)["input_ids"]) < max_length - 60
        and len(tiny_tokenizer(ex.prompt)["input_ids"]) > 3 * max_length
    )
    tokenized = tasks.tokenize_example(example, tiny_tokenizer, max_length=max_length)
    assert len(tokenized.input_ids) <= max_length
    assert decode(tiny_tokenizer, label_ids(tokenized)) == example.response + "<|endoftext|>"
    prompt = decode(tiny_tokenizer, tokenized.input_ids[: tokenized.labels.count(-100)])
    start, end = example.document_span
    head, document, tail = example.prompt[:start], example.prompt[start:end], example.prompt[end:]
    assert prompt.startswith(head) and prompt.endswith(tail)
    kept_document = prompt[len(head) : len(prompt) - len(tail)]
    assert kept_document and document.startswith(kept_document)
    assert len(kept_document) < len(document)


def test_response_longer_than_max_length_is_cut_from_the_right(shared_data, tiny_tokenizer):
    examples = tasks.load_examples("cnn_dailymail", "all", shared_data / FILES["cnn_dailymail"])
    example = next(ex for ex in examples if len(tiny_tokenizer(ex.response)["input_ids"]) > 128)
    tokenized = tasks.tokenize_example(example, tiny_tokenizer, max_length=128)
    assert len(tokenized.input_ids) == 128
    prompt = decode(tiny_tokenizer, tokenized.input_ids[: tokenized.labels.count(-100)])
    assert prompt.endswith("Article:\n\n\nSummary:\n")  # the document gave way first
    labelled = decode(tiny_tokenizer, label_ids(tokenized))
    assert len(labelled) > 20 and example.response.startswith(labelled)


def test_examples_without_label_tokens_are_dropped(tiny_tokenizer):
    short = Example(prompt="Q: 2+2?\n", response="4", source_index=0)
    long = Example(prompt="word " * 200, response="4", source_index=1)
    no_labels = tasks.tokenize_example(long, tiny_tokenizer, max_length=50)
    assert set(no_labels.labels) == {-100}
    kept = tasks.tokenize_examples([short, long], tiny_tokenizer, max_length=50)
    assert [item.source_index for item in kept] == [0]
    with pytest.raises(UserError, match="max_length=50"):
        tasks.tokenize_examples([long], tiny_tokenizer, max_length=50)


def test_chat_template_wraps_the_prompt(shared_data, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    example = tasks.load_examples("gsm8k", "all", shared_data / FILES["gsm8k"], limit=1)[0]
    prompt_text, full_text = tasks.render(example, tokenizer, chat_template=True)
    assert prompt_text == f"<user>{example.prompt}</user><bot>"
    assert full_text == prompt_text + example.response + tokenizer.eos_token
    tokenized = tasks.tokenize_example(example, tokenizer, max_length=2048, chat_template=True)
    assert decode(tokenizer, label_ids(tokenized)) == example.response + tokenizer.eos_token
    with pytest.raises(UserError, match="chat template"):
        tasks.render(example, tiny_tokenizer, chat_template=True)


# --- arith -----------------------------------------------------------------------------------

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> float:
    """Value of an arithmetic expression of integers and + - * /."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return value(node.left) / value(node.right)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not arithmetic: {expression}")

    return value(ast.parse(expression, mode="eval").body)


# each question pattern with the answer worked out independently of the generator
_ARITH_SOLVERS = [
    (r"buys (\d+) .+ at \$(\d+) each and pays with a \$(\d+) bill", lambda n, p, b: b - n * p),
    (
        r"buys (\d+) .+ for \$(\d+) each and (\d+) .+ for \$(\d+) each",
        lambda n, p, m, q: n * p + m * q,
    ),
    (
        r"at (\d+) miles per hour for (\d+) hours and then at (\d+) miles per hour for (\d+) hours",
        lambda s, h, t, k: s * h + t * k,
    ),
    (
        r"drive (\d+) miles at (\d+) miles per hour\. \w+ also stops for a (\d+)-minute break",
        lambda d, s, b: d * 60 // s + b,
    ),
    (
        r"has (\d+) \w+\. \w+ keeps (\d+) for \w+ and shares the rest equally among (\d+) friends",
        lambda t, k, f: (t - k) // f,
    ),
    (
        r"is (\d+) years old\. \w+ is (\d+) years older than \w+\. .* ages in (\d+) years",
        lambda a, g, y: 2 * a + g + 2 * y,
    ),
    (
        r"earns \$(\d+) an hour\. \w+ works (\d+) hours a day for (\d+) days",
        lambda w, h, d: w * h * d,
    ),
    (r"costs \$(\d+)\. During a sale it is (\d+)% off", lambda p, c: p - p * c // 100),
    (
        r"book with (\d+) pages\. \w+ reads (\d+) pages every day\. .* after (\d+) days",
        lambda t, p, d: t - p * d,
    ),
    (
        r"plants (\d+) rows of \w+ with (\d+) plants in each row\. (\d+) of",
        lambda r, c, x: r * c - x,
    ),
]


def solve_arith(question: str) -> int:
    answers = []
    for pattern, solve in _ARITH_SOLVERS:
        match = re.search(pattern, question)
        if match:
            answers.append(solve(*map(int, match.groups())))
    assert len(answers) == 1, question
    return answers[0]


def test_arith_is_deterministic_by_seed_and_correct():
    examples = tasks.load_examples("arith", "all", limit=300, seed=7)
    assert examples == tasks.load_examples("arith", "all", limit=300, seed=7)
    assert examples != tasks.load_examples("arith", "all", limit=300, seed=8)
    assert len({example.prompt for example in examples}) >= 290  # varied, not a few repeats
    used_templates = set()
    for example in examples:
        question = example.prompt.removesuffix(tasks.GSM8K_QUESTION_PROMPT)
        assert example.prompt == question + tasks.GSM8K_QUESTION_PROMPT
        # gsm8k's replacement of "#### N" keeps its space: "The final answer is:  N"
        final = re.search(r"The final answer is: +(\d+)$", example.response)
        assert final, example.response
        steps = re.findall(r"<<([^=>]+)=([^>]+)>>", example.response)
        assert len(steps) >= 2
        for expression, result in steps:
            assert evaluate(expression) == int(result), example.response
        assert int(final.group(1)) == int(steps[-1][1]) == solve_arith(question)
        used_templates.add(next(p for p, _ in _ARITH_SOLVERS if re.search(p, question)))
        assert 200 < len(example.prompt + example.response) < 500  # short: a CPU demo
    assert len(used_templates) == len(_ARITH_SOLVERS)


def test_arith_splits_and_limit_beyond_the_default_size():
    splits = {s: tasks.load_examples("arith", s) for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1800, 100, 100]
    indices = [{ex.source_index for ex in splits[s]} for s in splits]
    assert set.union(*indices) == set(range(tasks.ARITH_DEFAULT_ROWS))
    longer = tasks.load_examples("arith", "train", limit=2500)
    assert len(longer) == 2500 and longer[:1800] == splits["train"]
    assert not {ex.source_index for ex in longer} & (indices[1] | indices[2])


# --- sources, hashes, preview ----------------------------------------------------------------


def test_data_files_hash(shared_data, tmp_path):
    assert tasks.data_files_hash(shared_data / FILES["gsm8k"]) == GSM8K_SHA256
    assert tasks.data_files_hash(None) is None
    (tmp_path / "a.jsonl").write_text("1")
    (tmp_path / "b.jsonl").write_text("2")
    pair = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert tasks.data_files_hash(pair) != tasks.data_files_hash(pair[::-1])


def test_hub_native_and_carved_splits(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def rows(n, offset):
        return {
            "question": [f"q{offset + i}" for i in range(n)],
            "answer": [f"a #### {i}" for i in range(n)],
        }

    fake = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows(60, 0)), test=datasets.Dataset.from_dict(rows(7, 60))
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)
    split_of = {s: tasks.load_examples("gsm8k", s) for s in tasks.SPLITS}
    assert [ex.prompt.split("\n")[0] for ex in split_of["test"]] == [f"q{i}" for i in range(60, 67)]
    assert len(split_of["validation"]) == 3 and len(split_of["train"]) == 57
    train = {ex.source_index for ex in split_of["train"]}
    assert not train & {ex.source_index for ex in split_of["validation"]}
    assert [ex.source_index for ex in split_of["all"]] == list(range(67))
    assert len(tasks.load_examples("gsm8k", "train", limit=5)) == 5


def test_hub_mbpp_splits_by_task_id_across_native_splits(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def rows(task_ids):
        return datasets.Dataset.from_dict(
            {
                "task_id": task_ids,
                "text": [f"t{task_id}" for task_id in task_ids],
                "code": ["pass"] * len(task_ids),
                "test_list": [["assert True"]] * len(task_ids),
            }
        )

    # task ids deliberately in the "wrong" hub splits: the task_id ranges decide, not the hub
    fake = datasets.DatasetDict(
        test=rows([700, 12]), prompt=rows([3]), train=rows([520, 11, 650]), validation=rows([600])
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)

    def task_ids(split):
        return [
            int(ex.prompt.split("task: t")[1].split()[0])
            for ex in tasks.load_examples("mbpp", split)
        ]

    # source order: train, validation, test, then the hub's other splits
    assert task_ids("all") == [520, 11, 650, 600, 700, 12, 3]
    assert task_ids("test") == [11, 12]
    assert task_ids("validation") == [520, 600]
    assert task_ids("train") == [650, 700]


def test_hub_unreachable_names_the_fix(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="hub is unreachable.*--data-files PATH"):
        tasks.load_examples("xsum", "test")


def test_preview_shows_what_is_trained_on(shared_data, tiny_tokenizer):
    path = shared_data / FILES["gsm8k"]
    text = tasks.preview("gsm8k", tiny_tokenizer, split="all", data_files=path, limit=2)
    example = tasks.load_examples("gsm8k", "all", path, limit=1)[0]
    tokenized = tasks.tokenize_example(example, tiny_tokenizer)
    n_labels = len(label_ids(tokenized))
    n_total = len(tokenized.input_ids)
    assert f"{n_total} total, {n_total - n_labels} prompt, {n_labels} label" in text
    assert f"label span {n_total - n_labels}..{n_total - 1}" in text
    assert example.response + "<|endoftext|>" in text
    assert example.prompt in text
    assert text.count("=== source_index") == 2


# (sha256 of the examples' text, sha256 of their token ids and labels), 16 hex digits each, of
# the first 24 examples of each split (seed 3; the tiny tokenizer, max_length 256, so summaries
# are cut), frozen when tasks.py became a package to prove it kept every example, split and
# token. A deliberate template or truncation change bumps template_version and refreshes these.
FROZEN_DIGESTS = {
    "gsm8k-1 train": "461b6236396f31c4 7416e6e60bbb9e45",
    "gsm8k-1 validation": "a169382b324223f0 bde59a894d8afdd4",
    "gsm8k-1 test": "00d702ed7481b826 b4c4d6b365389812",
    "gsm8k-1 all": "66696931f7f78139 8ac3d599b7a7d4a6",
    "alpaca-1 train": "b683f8408d2e745b 5d4ed1a0ec755282",
    "alpaca-1 validation": "ceed99d0105231bd 7353b4a04c944c40",
    "alpaca-1 test": "84179f06d0525c26 b584e615758a4239",
    "alpaca-1 all": "e6d3f4466b2380f5 5edff15f019ed989",
    "mbpp-1 train": "44c1bd9f5643dee8 e86f7af33abc5498",
    "mbpp-1 validation": "f4ca7d3a0383bce0 90a2d735fe9fdd10",
    "mbpp-1 test": "03b18d5362bd8e2b f31f3f74d04fedea",
    "mbpp-1 all": "56651938aa3932f6 cd5d432d2892d576",
    "cnn_dailymail-1 train": "6c17874bd9badf76 a65fc6111e7d3cf8",
    "cnn_dailymail-1 validation": "d0065f81415f8710 43de162fbb729657",
    "cnn_dailymail-1 test": "c8a6b381ca631c45 f1d278afa32f5445",
    "cnn_dailymail-1 all": "0d43c7583e04112a 483edb8f1ced447e",
    "xsum-1 train": "4996c5fd0130867a 801f27cb0838e7d5",
    "xsum-1 validation": "ba549fbde2179ce4 65432ac14ef04bf6",
    "xsum-1 test": "8456fa92be27d9b7 73f9b21a2b8af8f1",
    "xsum-1 all": "b8e822d8fbfa5fdf eaab06fadba2f13e",
    "arith-1 train": "9047568b73f0cad2 67da08418f5a0d1b",
    "arith-1 validation": "2597a0b0fc16a423 b034c36c916e5a48",
    "arith-1 test": "5b094e0860e68e99 6c9f1c3690af0f1e",
    "arith-1 all": "39f150399d3e3ac8 c2a03f2c30c4c345",
}


def short_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


@pytest.mark.parametrize("task", SINGLE_TURN)
def test_examples_splits_and_tokens_match_frozen_digests(task, shared_data, tiny_tokenizer):
    for split in tasks.SPLITS:
        key = f"{tasks.template_version(task)} {split}"
        examples = tasks.load_examples(task, split, data_files(shared_data, task), 24, seed=3)
        tokenized = tasks.tokenize_examples(examples, tiny_tokenizer, max_length=256)
        text = [[ex.prompt, ex.response, ex.source_index, ex.document_span] for ex in examples]
        ids = [[item.input_ids, item.labels, item.source_index] for item in tokenized]
        text_digest, ids_digest = FROZEN_DIGESTS[key].split()
        assert short_sha256(text) == text_digest, f"{key}: other examples or splits"
        assert short_sha256(ids) == ids_digest, f"{key}: other token ids or labels"


# --- user errors -----------------------------------------------------------------------------


def test_unknown_task_lists_valid_names():
    with pytest.raises(UserError, match="unknown task 'gsm9k'.*gsm8k, alpaca, mbpp"):
        tasks.load_examples("gsm9k")
    with pytest.raises(UserError, match="unknown task"):
        tasks.template_version("nope")


def test_unknown_split(shared_data):
    with pytest.raises(UserError, match="unknown split 'dev'.*train, validation, test, all"):
        tasks.load_examples("gsm8k", "dev", shared_data / FILES["gsm8k"])


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match="not found: .*nowhere.jsonl"):
        tasks.load_examples("gsm8k", "all", tmp_path / "nowhere.jsonl")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"rows.parquet: unsupported file type '\.parquet'"):
        tasks.load_examples("gsm8k", "all", tmp_path / "rows.parquet")


def test_malformed_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    good = json.dumps({"question": "q", "answer": "a #### 1"})
    path.write_text(f"{good}\n{good}\n\n{json.dumps({'question': 'q'})}\n")
    with pytest.raises(UserError, match=r"^gsm8k.jsonl line 4: missing field 'answer'"):
        tasks.load_examples("gsm8k", "all", path)
    path.write_text(f"{good}\n{{not json\n")
    with pytest.raises(UserError, match=r"^gsm8k.jsonl line 2: invalid JSON"):
        tasks.load_examples("gsm8k", "all", path)
    csv_path = tmp_path / "news.csv"
    csv_path.write_text('article,id\n"one\nstory",1\n"two",2\n')
    with pytest.raises(UserError, match=r"^news.csv line 2: missing field 'highlights'"):
        tasks.load_examples("cnn_dailymail", "all", csv_path)
    json_path = tmp_path / "alpaca.json"
    json_path.write_text('[{"instruction": "i", "output": "o"},\n {"instruction": "i"}]')
    with pytest.raises(UserError, match=r"^alpaca.json item 1: missing field 'output'"):
        tasks.load_examples("alpaca", "all", json_path)


def test_empty_result_and_bad_arguments(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="has no rows"):
        tasks.load_examples("gsm8k", "all", path)
    with pytest.raises(UserError, match="arith.*drop --data-files"):
        tasks.load_examples("arith", "all", path)
    with pytest.raises(UserError, match="limit must be at least 1, got 0"):
        tasks.load_examples("arith", "all", limit=0)
