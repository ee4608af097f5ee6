"""How faithful a sparse cache is to the dense target it was built from: the fidelity study's
measures (`python -m studies.fidelity`; tested in tests/test_fidelity.py).

Two questions, asked of the same label tokens:

1. How far is the per-token loss computed from the cache (top-K + tail, or sampled) from the
   loss over the full vocabulary? `error_summary` gives the median and p95 relative error.
2. Does AdaSPEC keep the same tokens? `selection_jaccard` applies the official micro-batch rule
   (keep the top-k fraction of delta = L_draft - L_ref) to the cached and to the dense losses of
   the same draft and reference, and compares the kept sets.

`per_token_losses` computes those losses for several models against several caches of the same
sequences and against the dense target in one pass (each model's logits once per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from adaspec import labels, losses, selection
from adaspec.models import cut_logits
from adaspec.sparse import from_rows
from cache_tools.store import CacheReader

# ---------------------------------------------------------------------------------------------
# Pure math on per-token values


def relative_error(sparse: torch.Tensor, dense: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """|sparse - dense| / max(dense, floor) per token, float64.

    Args:
        sparse: (N,) per-token loss from the cache.
        dense: (N,) per-token loss over the full vocabulary (>= 0).
    """
    if sparse.shape != dense.shape:
        raise ValueError(f"sparse {tuple(sparse.shape)} and dense {tuple(dense.shape)} differ")
    dense64 = dense.double()
    return (sparse.double() - dense64).abs() / dense64.clamp_min(floor)


def error_summary(sparse: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """Median and 95th percentile of the relative error, and the mean signed error (bias)."""
    rel = relative_error(sparse, dense).numpy()  # numpy: no size limit, linear interpolation
    return {
        "median": float(np.quantile(rel, 0.5)),
        "p95": float(np.quantile(rel, 0.95)),
        "mean_signed": float((sparse.double() - dense.double()).mean()),
    }


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two boolean masks of the same tokens (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks {tuple(a.shape)} and {tuple(b.shape)} differ")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def select_by_batches(draft_loss: torch.Tensor, ref_loss: torch.Tensor, k: float,
                      batch_rows: list[int]) -> torch.Tensor:
    """AdaSPEC's micro-batch rule applied batch by batch; `batch_rows` are the batch sizes."""
    if sum(batch_rows) != len(draft_loss):
        raise ValueError(f"batch sizes sum to {sum(batch_rows)}, not {len(draft_loss)} tokens")
    keep = [
        selection.adaspec_select(d, r, k, "batch")
        for d, r in zip(draft_loss.split(batch_rows), ref_loss.split(batch_rows), strict=True)
    ]
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)


def selection_jaccard(draft_sparse: torch.Tensor, ref_sparse: torch.Tensor,
                      draft_dense: torch.Tensor, ref_dense: torch.Tensor, k: float,
                      batch_rows: list[int]) -> float:
    """Jaccard of the tokens AdaSPEC keeps with cached losses vs with dense losses."""
    return jaccard(select_by_batches(draft_sparse, ref_sparse, k, batch_rows),
                   select_by_batches(draft_dense, ref_dense, k, batch_rows))


def paired_difference(a: torch.Tensor, b: torch.Tensor,
                      group_sizes: list[int] | None = None) -> tuple[float, float]:
    """Mean of a - b over the same tokens and its standard error (paired).

    With `group_sizes` (tokens per sequence, in order) the error is clustered by sequence:
    tokens of one sequence are not independent, so the spread of per-sequence sums counts,
    se = sqrt(G / (G - 1) * sum_g (S_g - n_g * mean)^2) / N. One token per group gives the
    usual sd / sqrt(N).
    """
    diff = a.double() - b.double()
    n = len(diff)
    mean = diff.mean()
    if group_sizes is None:
        group_sizes = [1] * n
    if sum(group_sizes) != n:
        raise ValueError(f"group sizes sum to {sum(group_sizes)}, not {n} tokens")
    g = len(group_sizes)
    if g < 2:
        return float(mean), float("nan")
    sums = torch.stack([part.sum() for part in diff.split(group_sizes)])
    sizes = torch.tensor(group_sizes, dtype=torch.float64)
    stderr = torch.sqrt(g / (g - 1) * ((sums - sizes * mean) ** 2).sum()) / n
    return float(mean), float(stderr)


def micro_batch_rows(label_offsets: np.ndarray, batch_size: int) -> list[int]:
    """Label rows of consecutive micro-batches of `batch_size` sequences (cache order)."""
    edges = list(range(0, len(label_offsets) - 1, batch_size)) + [len(label_offsets) - 1]
    return [int(label_offsets[b] - label_offsets[a])
            for a, b in zip(edges[:-1], edges[1:], strict=True)]


# ---------------------------------------------------------------------------------------------
# Losses of models against caches and the dense target


TargetLogits = Callable[[list[np.ndarray], list[np.ndarray], int], torch.Tensor]


def per_token_losses(
    scorers: Mapping[str, torch.nn.Module],
    readers: Mapping[str, CacheReader],
    target_logits: TargetLogits,
    pad_id: int,
    vocab_size: int,
    divergence: str = "fkl",
    batch_tokens: int = 4096,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-label-token losses of each scorer model, dense and against each cache.

    All readers must hold the same sequences (same task rows and tokenizer, any cache settings).
    `target_logits(seqs, masks, pad_id)` gives the target's (n, V') logits at the label rows.

    Returns {"dense": {scorer: (N,)}, <reader name>: {scorer: (N,)}}, float32, in cache order.
    """
    first = next(iter(readers.values()))
    for name, reader in readers.items():
        same_tokens = all(np.array_equal(x, y) for x, y in
                          zip(reader.all_tokens(), first.all_tokens(), strict=True))
        if not same_tokens or not np.array_equal(reader.label_offsets, first.label_offsets):
            raise ValueError(f"cache {name} holds other sequences than the first one")
    pairs = [first.sequence(i) for i in range(first.n_sequences)]
    plan = labels.plan_batches(np.array([len(p[0]) for p in pairs]), batch_tokens)
    out: dict[str, dict[str, list[torch.Tensor]]] = {
        key: {s: [] for s in scorers} for key in ("dense", *readers)
    }
    for a, b in tqdm(plan, desc="losses", disable=not progress, dynamic_ncols=True):
        seqs, masks = [p[0] for p in pairs[a:b]], [p[1] for p in pairs[a:b]]
        row0, row1 = int(first.label_offsets[a]), int(first.label_offsets[b])
        with torch.no_grad():
            target = cut_logits(target_logits(seqs, masks, pad_id), vocab_size).float().cpu()
            cached = {name: from_rows(reader.target_rows(row0, row1))
                      for name, reader in readers.items()}
            batch = labels.pad_batch(seqs, masks, pad_id)
            for scorer_name, model in scorers.items():
                logits = labels.LabelLogits(model, batch, vocab_size)().cpu()
                out["dense"][scorer_name].append(
                    losses.dense_divergence(logits, target, divergence))
                for name, rows in cached.items():
                    out[name][scorer_name].append(
                        losses.sparse_divergence(logits, rows, divergence))
    return {key: {s: torch.cat(v) for s, v in by.items()} for key, by in out.items()}
