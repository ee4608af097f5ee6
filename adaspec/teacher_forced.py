"""Teacher-forced acceptance of drafts: offline against a cache's sparse target rows (no target
loaded) and exact with the target over the full vocabulary.

offline: the mean over label tokens of sum_x min(p, q) = 1 - TVD(p, q) (the probability that a
token sampled from the draft is accepted) lies between bounds set by the cached entries (top-K, or
the distinct sampled tokens of a sampled cache) and the mass outside them; plus the greedy
agreement rate (draft argmax == the target's top-1; in a sampled cache, the most probable sampled
token). exact: the same two numbers with the target loaded. Used by evaluation, validation during
training, the sweep and the benches; nothing here decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from adaspec import acceptance, labels, sparse
from adaspec.config import Config
from adaspec.stream import online_sequences
from cache_tools.store import CacheReader


@dataclass
class Sequences:
    """Sequences to score teacher-forced: (input_ids (T,) int64, label_mask (T,) bool) pairs."""

    input_ids: list[np.ndarray]
    label_masks: list[np.ndarray]


def cache_sequences(reader: CacheReader) -> Sequences:
    pairs = [reader.sequence(i) for i in range(reader.n_sequences)]
    return Sequences([p[0] for p in pairs], [p[1] for p in pairs])


def task_sequences(cfg: Config, tokenizer) -> Sequences:
    seqs = online_sequences(cfg, tokenizer)
    pairs = [seqs.sequence(i) for i in range(seqs.n_sequences)]
    return Sequences([p[0] for p in pairs], [p[1] for p in pairs])


def _batches(n: int, lengths: list[int], batch_tokens: int) -> list[tuple[int, int]]:
    return labels.plan_batches(np.asarray(lengths), batch_tokens) if n else []


def label_logprobs(model, ids, masks, pad_id: int, vocab_size: int) -> torch.Tensor:
    """(N, V) float32 log-probs (on the CPU) at the label rows of a batch of sequences."""
    batch = labels.pad_batch(ids, masks, pad_id)
    return labels.LabelLogits(model, batch, vocab_size)().cpu().log_softmax(-1)


def offline_acceptance(
    draft, reader: CacheReader, vocab_size: int, pad_id: int, batch_tokens: int = 4096,
    progress: bool = True,
) -> dict:
    """Acceptance of `draft` against the cached target of `reader` (no target model)."""
    seqs = cache_sequences(reader)
    lower_sum = upper_sum = agree = 0.0
    n_tokens = 0
    plan = _batches(reader.n_sequences, [len(x) for x in seqs.input_ids], batch_tokens)
    for a, b in tqdm(plan, desc="offline", disable=not progress, dynamic_ncols=True):
        draft_lp = label_logprobs(draft, seqs.input_ids[a:b], seqs.label_masks[a:b], pad_id,
                                   vocab_size)
        rows = reader.target_rows(int(reader.label_offsets[a]), int(reader.label_offsets[b]))
        ids, logprobs, tail = sparse.known_entries(sparse.from_rows(rows))
        lower, upper = acceptance.sparse_acceptance_bounds(ids, logprobs, tail, draft_lp)
        top1 = ids.gather(1, logprobs.argmax(-1, keepdim=True))[:, 0]  # (N,)
        lower_sum += float(lower.double().sum())
        upper_sum += float(upper.double().sum())
        agree += float((draft_lp.argmax(-1) == top1).double().sum())
        n_tokens += len(lower)
    n = max(n_tokens, 1)
    return {
        "expected_acceptance_lower": lower_sum / n,
        "expected_acceptance_upper": upper_sum / n,
        "greedy_agreement": agree / n,
        "label_tokens": n_tokens,
    }


def exact_acceptance_many(
    drafts: list, target, seqs: Sequences, vocab_size: int, pad_id: int,
    batch_tokens: int = 4096, progress: bool = True, per_token: bool = False,
) -> list[dict]:
    """Teacher-forced acceptance over the full vocabulary, with the target loaded, for several
    drafts at once: the target's log-probs of each batch are computed once for all of them.

    `per_token` also returns each label token's values (`per_token`: expected_acceptance and
    greedy_agreement lists in sequence order, with `sequence_lengths`), for paired statistics.
    """
    totals = [[0.0, 0.0] for _ in drafts]
    tokens: list[dict[str, list]] = [{"expected_acceptance": [], "greedy_agreement": []}
                                     for _ in drafts]
    n_tokens = 0
    plan = _batches(len(seqs.input_ids), [len(x) for x in seqs.input_ids], batch_tokens)
    for a, b in tqdm(plan, desc="exact", disable=not progress, dynamic_ncols=True):
        ids, masks = seqs.input_ids[a:b], seqs.label_masks[a:b]
        target_lp = label_logprobs(target, ids, masks, pad_id, vocab_size)
        for d, draft in enumerate(drafts):
            draft_lp = label_logprobs(draft, ids, masks, pad_id, vocab_size)
            accept = acceptance.expected_acceptance(target_lp, draft_lp).double()  # (N,)
            agree = acceptance.greedy_agreement(target_lp, draft_lp).double()  # (N,)
            totals[d][0] += float(accept.sum())
            totals[d][1] += float(agree.sum())
            if per_token:
                tokens[d]["expected_acceptance"] += accept.tolist()
                tokens[d]["greedy_agreement"] += agree.tolist()
        n_tokens += len(target_lp)
    n = max(n_tokens, 1)
    out = [{"expected_acceptance": t[0] / n, "greedy_agreement": t[1] / n,
            "label_tokens": n_tokens} for t in totals]
    if per_token:
        lengths = [int(np.count_nonzero(m)) for m in seqs.label_masks]
        for result, values in zip(out, tokens, strict=True):
            result["per_token"] = {**values, "sequence_lengths": lengths}
    return out


def exact_acceptance(
    draft, target, seqs: Sequences, vocab_size: int, pad_id: int, batch_tokens: int = 4096,
    progress: bool = True,
) -> dict:
    """Teacher-forced acceptance over the full vocabulary, with the target loaded."""
    return exact_acceptance_many([draft], target, seqs, vocab_size, pad_id, batch_tokens,
                                 progress)[0]
