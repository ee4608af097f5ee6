"""Does the target speak the task? Its held-out task quality and the length of what it says.

Acceptance is only worth measuring on the text the target really produces at serving time; a
target that answers a task prompt with "A:" and stops gives drafts nothing to learn. This module
scores a model's greedy outputs on a split's prompts: final-answer accuracy for the arithmetic
tasks (gsm8k, arith: the number after "The final answer is:" or "####", else the last number),
unigram F1 against the reference response for the others (SQuAD-style overlap), and the mean
number of tokens it generates.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
from tqdm.auto import tqdm

from adaspec import models, speculative, tasks
from adaspec.config import Config

ANSWER_TASKS = ("gsm8k", "arith")  # scored by their final number
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_MARKERS = ("The final answer is:", "####")


def final_answer(text: str) -> str | None:
    """The number a response ends on: after the last answer marker if there is one, else the
    last number in the text; commas and a trailing '.0' dropped. None if there is none."""
    marked = [m for m in _MARKERS if m in text]
    if marked:  # the model gave an answer: it is the first number after the marker, or none
        after = _NUMBER.findall(text.rsplit(marked[0], 1)[1])
        if not after:
            return None
        number = after[0]
    else:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        number = numbers[-1]
    number = number.replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def _words(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return text.split()


def overlap_f1(prediction: str, reference: str) -> float:
    """Unigram F1 of two texts (lowercased, punctuation dropped)."""
    pred, ref = _words(prediction), _words(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(task: str, prediction: str, reference: str) -> float:
    """1/0 final-answer match for the arithmetic tasks, unigram F1 for the others."""
    if task in ANSWER_TASKS:
        answer = final_answer(prediction)
        return float(answer is not None and answer == final_answer(reference))
    return overlap_f1(prediction, reference)


@torch.no_grad()
def target_quality(cfg: Config, model, tokenizer, n_prompts: int, max_new_tokens: int,
                   progress: bool = True) -> dict:
    """Greedy outputs of `model` on the first `n_prompts` prompts of cfg's task split, scored.

    Prompts are rendered as the cache renders them (`--chat-template` included), so the numbers
    describe the text a cache built with the same settings would hold.
    """
    examples = tasks.load_split(cfg.data)[:n_prompts]
    device = next(model.parameters()).device
    vocab = models.real_vocab_size(tokenizer)
    scores, lengths, samples = [], [], []
    for ex in tqdm(examples, desc="target quality", disable=not progress, dynamic_ncols=True):
        ids = tasks.prompt_ids(ex, tokenizer, cfg.data.chat_template, cfg.data.max_length)
        out = speculative.target_generate(model, torch.tensor([ids], device=device),
                                          max_new_tokens, 0.0, tokenizer.eos_token_id, vocab)
        text = tokenizer.decode(out.tolist(), skip_special_tokens=True)
        scores.append(score(cfg.data.task, text, ex.response))
        lengths.append(int(out.shape[0]))
        if len(samples) < 3:
            samples.append(text[:300])
    n = max(len(scores), 1)
    return {"task": cfg.data.task, "split": cfg.data.split,
            "chat_template": cfg.data.chat_template,
            "metric": "final-answer accuracy" if cfg.data.task in ANSWER_TASKS
            else "unigram F1 with the reference",
            "quality": sum(scores) / n, "mean_output_tokens": sum(lengths) / n,
            "prompts": len(scores), "max_new_tokens": max_new_tokens, "samples": samples}
