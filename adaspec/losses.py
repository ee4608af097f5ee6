"""Per-token divergences between the draft and the target, dense or against the sparse cache.

Every divergence here is an f-divergence D_f(p || q) = sum_v p_v f(q_v / p_v), with p the target
distribution and q the draft distribution over the vocabulary. The sparse cache keeps only a few
"atoms" of p per label token, and both cache modes reduce to one computation: a sum over atoms of
w * f(r), where w is the atom's weight and log r = draft logprob - target logprob.

- "topk" mode: the K largest target log-probs plus a tail bucket holding the remaining mass.
  Atoms are the K tokens (w = p_k) and the tail (w = p_tail, r = q_tail / p_tail). This is the
  divergence between the coarse-grained distributions over K + 1 outcomes: exact when K = V and,
  by the data processing inequality, never above the dense value.
- "sample" mode (Anshumann et al. 2025, "Sparse Logit Sampling"): S tokens drawn with replacement
  from p, stored as unique ids with counts c. Atoms are those ids with w = c / S; since
  E[c_v / S] = p_v, sum_k (c_k / S) f(q_k / p_k) is an unbiased estimate of D_f. No tail term.

The divergences (r = q / p):

- "fkl": forward KL(p || q), f(r) = -log r. The official AdaSPEC loss,
  `KLDivLoss(reduction="none")(log_softmax(draft), softmax(target)).sum(-1)`.
- "rkl": reverse KL(q || p), f(r) = r log r.
- "tvd": total variation 0.5 * sum_v |p_v - q_v|, f(r) = |r - 1| / 2.
- "jsd": generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1) exactly as
  TRL's `GKDTrainer.generalized_jsd_loss` (huggingface/trl, trl/trainer/gkd_trainer.py):
  m = beta * p + (1 - beta) * q (beta weighs the target), JSD = beta * KL(p || m)
  + (1 - beta) * KL(q || m); as f-divergence, with a = beta + (1 - beta) r = m / p,
  f(r) = -beta log a + (1 - beta) r log(r / a). Like TRL, beta = 0 gives KL(p || q) ("fkl") and
  beta = 1 gives KL(q || p) ("rkl") rather than the formula's degenerate limit 0.

Reduced-vocabulary drafts (`restricted_divergence`): a draft whose head covers only a token map
of N ids plus one "rest" outcome (every other id) is trained on the target coarse-grained the
same way, over N + 1 outcomes. From the cache: in topk mode the atoms are the cached ids inside
the map, and everything else (cached ids outside the map, and the tail) is one bucket, on both
sides: exact when K = V, else a lower bound, as above. In sample mode the draws inside the map
are atoms as before and the draws outside it are the rest atom, whose target mass is estimated
by their share of the draws (the cache does not know the mass of ids it did not draw); its
forward-KL gradient stays unbiased.

Numerics: computed from log-probs in float32 (float64 inputs stay float64); zero-weight atoms
(w = 0, including a -inf tail when K = V and padding in sample mode) contribute exactly 0 with
zero gradient, through `torch.where` on sanitised inputs, never 0 * inf. Where the target has no
mass but the draft has q > 0 (target logits of -inf), the f-divergence's limit term
q * lim_{r->inf} f(r) / r is added: 0 for fkl, q / 2 for tvd, -(1 - beta) log(1 - beta) q for
jsd and +inf for rkl, so dense and K = V values stay the true divergences.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from adaspec.sparse import SparseTarget

DIVERGENCES = ("fkl", "rkl", "tvd", "jsd")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (or integer) -> float32; float32 and float64 are kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_divergence(divergence: str, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta!r} is outside [0, 1]")


def _check_rows(draft_logits: torch.Tensor, target: SparseTarget, width: str) -> None:
    """Draft logits must be (N, width): one row per cached label token."""
    if draft_logits.dim() != 2 or draft_logits.shape[0] != len(target):
        raise ValueError(
            f"draft_logits {tuple(draft_logits.shape)} must be (N, {width}) with N = "
            f"{len(target)} cached label tokens"
        )


def _resolve(divergence: str, beta: float) -> str:
    """TRL's jsd endpoints: beta = 0 is forward KL, beta = 1 is reverse KL."""
    if divergence == "jsd" and beta == 0.0:
        return "fkl"
    if divergence == "jsd" and beta == 1.0:
        return "rkl"
    return divergence


def _weighted_terms(
    log_weight: torch.Tensor, log_ratio: torch.Tensor, divergence: str, beta: float
) -> torch.Tensor:
    """w * f(r) per atom, from log w and log r = log q - log p (p > 0 wherever w > 0).

    Args:
        log_weight: (..., A) float log-weights; -inf marks a zero-weight atom.
        log_ratio: (..., A) float, same shape; ignored where the weight is 0.

    Returns:
        (..., A) float terms; exactly 0 (with zero gradient) for zero-weight atoms.
    """
    divergence = _resolve(divergence, beta)
    # Sanitise before computing so the unused branch of the final where holds no inf/NaN whose
    # gradient (0 * inf) would poison the result. A NaN weight stays live so that a corrupt
    # cache entry shows up instead of vanishing.
    live = log_weight != -math.inf
    log_w = torch.where(live, log_weight, 0.0)
    log_r = torch.where(live, log_ratio, 0.0)
    # q = 0 (log r = -inf) is a legal draft value: r log r -> 0 there.
    has_q = log_r != -math.inf
    log_r_q = torch.where(has_q, log_r, 0.0)
    weight = log_w.exp()
    weighted_r = torch.where(has_q, (log_w + log_r_q).exp(), 0.0)  # w * r (= q when w = p)

    if divergence == "fkl":
        terms = -weight * log_r
    elif divergence == "rkl":
        terms = weighted_r * log_r_q
    elif divergence == "tvd":
        terms = 0.5 * (weighted_r - weight).abs()
    else:  # jsd, 0 < beta < 1
        # log a = log(beta + (1 - beta) r) = log(m / p)
        log_a = torch.logaddexp(
            torch.full_like(log_r, math.log(beta)), log_r + math.log1p(-beta)
        )
        terms = -beta * weight * log_a + (1.0 - beta) * weighted_r * (log_r_q - log_a)
    return torch.where(live, terms, 0.0)


def _mass_terms(
    target_logprobs: torch.Tensor, draft_logprobs: torch.Tensor, divergence: str, beta: float
) -> torch.Tensor:
    """p * f(q / p) per outcome, including the limit q * lim_{r->inf} f(r) / r where p = 0.

    That limit is 0 for fkl, q / 2 for tvd, -(1 - beta) log(1 - beta) q for jsd and +inf for
    rkl (when q > 0): outcomes the target never emits still count against the draft's mass.

    Args:
        target_logprobs: (..., A) float log p; -inf for outcomes of zero target mass.
        draft_logprobs: (..., A) float log q.

    Returns:
        (..., A) float terms.
    """
    divergence = _resolve(divergence, beta)
    terms = _weighted_terms(target_logprobs, draft_logprobs - target_logprobs, divergence, beta)
    if divergence == "fkl":
        return terms
    no_target = target_logprobs == -math.inf
    draft_probs = torch.where(no_target, draft_logprobs, -math.inf).exp()  # q where p = 0
    if divergence == "rkl":
        return terms + torch.where(draft_probs > 0, math.inf, 0.0)
    if divergence == "tvd":
        return terms + 0.5 * draft_probs
    return terms - (1.0 - beta) * math.log1p(-beta) * draft_probs


def dense_divergence(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    divergence: str = "fkl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence D(p_target || q_draft) over the full vocabulary.

    Args:
        draft_logits: (N, V) float, any float dtype (upcast to float32).
        target_logits: (N, V) float, any float dtype.
        divergence: one of DIVERGENCES.
        beta: the "jsd" mixing weight of the target (TRL convention), in [0, 1].

    Returns:
        (N,) float32 (float64 for float64 inputs) divergence per token.
    """
    _check_divergence(divergence, beta)
    if draft_logits.shape != target_logits.shape:
        raise ValueError(
            f"draft_logits {tuple(draft_logits.shape)} and target_logits "
            f"{tuple(target_logits.shape)} must have the same (N, V) shape"
        )
    draft_logprobs = torch.log_softmax(_upcast(draft_logits), dim=-1)  # (N, V)
    target_logprobs = torch.log_softmax(_upcast(target_logits), dim=-1)  # (N, V)
    return _mass_terms(target_logprobs, draft_logprobs, divergence, beta).sum(-1)


def _complement_logsumexp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log sum_{v not in ids} exp(logits_v) per row; -inf where ids cover the whole vocabulary.

    Summing the complement directly is exact, whereas log(1 - sum_k q_k) loses everything to
    cancellation once the cached entries hold nearly all the draft's mass.

    Args:
        logits: (N, V) float.
        ids: (N, K) int64.

    Returns:
        (N,) float.
    """
    cached = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)  # (N, V)
    has_rest = ~cached.all(-1)  # (N,)
    # A row with nothing left would take logsumexp over only -inf, whose backward is NaN: give
    # it its full logits instead and discard the result below.
    drop = cached & has_rest.unsqueeze(-1)  # (N, V)
    rest = torch.logsumexp(logits.masked_fill(drop, -math.inf), dim=-1)  # (N,)
    return torch.where(has_rest, rest, -math.inf)


def sparse_divergence(
    draft_logits: torch.Tensor,
    target: SparseTarget,
    divergence: str = "fkl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence of the draft against a sparse cached target (see module docstring).

    topk mode: the coarse-grained divergence over the K cached tokens plus the tail bucket
    (exact when K = V, else a lower bound of the dense value). sample mode: the unbiased
    estimate sum_k (c_k / S) f(q_k / p_k), S = counts.sum(-1) per row.

    Args:
        draft_logits: (N, V) float, any float dtype (upcast to float32); V covers every cached id.
        target: the cached entries of the same N label tokens.
        divergence: one of DIVERGENCES.
        beta: the "jsd" mixing weight of the target (TRL convention), in [0, 1].

    Returns:
        (N,) float32 (float64 for float64 inputs) divergence per token.
    """
    _check_divergence(divergence, beta)
    _check_rows(draft_logits, target, "V")
    logits = _upcast(draft_logits)  # (N, V)
    ids = target.ids.long()  # (N, K)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1)
    draft_logprobs = logits.gather(-1, ids) - lse  # (N, K)
    target_logprobs = _upcast(target.logprobs)  # (N, K)

    if target.tail_logmass is not None:
        target_tail = _upcast(target.tail_logmass)  # (N,)
        draft_tail = _complement_logsumexp(logits, ids) - lse.squeeze(-1)  # (N,)
        target_atoms = torch.cat([target_logprobs, target_tail.unsqueeze(-1)], -1)  # (N, K+1)
        draft_atoms = torch.cat([draft_logprobs, draft_tail.unsqueeze(-1)], -1)  # (N, K+1)
        terms = _mass_terms(target_atoms, draft_atoms, divergence, beta)
    else:
        counts = target.counts.to(draft_logprobs.dtype)  # (N, K)
        draws = counts.sum(-1, keepdim=True).clamp_min(1.0)  # (N, 1)
        log_weight = torch.where(counts > 0, counts.log() - draws.log(), -math.inf)  # (N, K)
        log_ratio = draft_logprobs - target_logprobs  # (N, K)
        terms = _weighted_terms(log_weight, log_ratio, divergence, beta)
    return terms.sum(-1)


def restricted_divergence(
    draft_logits: torch.Tensor,
    target: SparseTarget,
    to_draft: torch.Tensor,
    divergence: str = "fkl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence of a reduced-vocabulary draft against a sparse cached target.

    The draft's N + 1 outcomes are the N ids of its token map and a "rest" outcome (index N)
    for every other id; the target is coarse-grained onto them (module docstring).

    Args:
        draft_logits: (N_tok, N + 1) float: the mapped ids' logits, then the rest logit.
        target: the cached entries (full-vocabulary ids) of the same N_tok label tokens.
        to_draft: (V,) int64: each vocabulary id's draft outcome (N for ids outside the map).
        divergence: one of DIVERGENCES.
        beta: the "jsd" mixing weight of the target (TRL convention), in [0, 1].

    Returns:
        (N_tok,) float32 (float64 for float64 inputs) divergence per token.
    """
    _check_divergence(divergence, beta)
    _check_rows(draft_logits, target, "N_map + 1")
    logits = _upcast(draft_logits)  # (n, N+1)
    rest = logits.shape[-1] - 1
    outcome = to_draft[target.ids.long()]  # (n, K) draft outcome of each cached id
    mapped = outcome != rest  # (n, K)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    draft_lp = logits.gather(-1, outcome) - lse  # (n, K); the rest's value where unmapped
    target_lp = _upcast(target.logprobs)  # (n, K)
    if target.tail_logmass is not None:
        # Bucket = everything but the cached mapped ids, on both sides.
        target_rest = torch.logsumexp(torch.cat([
            _upcast(target.tail_logmass).unsqueeze(-1),
            torch.where(mapped, -math.inf, target_lp)], -1), -1)  # (n,)
        listed = torch.zeros_like(logits).scatter_add_(
            -1, outcome, mapped.to(logits.dtype)) > 0  # (n, N+1); the rest column never
        draft_rest = torch.logsumexp(logits.masked_fill(listed, -math.inf), -1) - \
            lse.squeeze(-1)  # (n,)
        target_atoms = torch.cat([torch.where(mapped, target_lp, -math.inf),
                                  target_rest.unsqueeze(-1)], -1)  # (n, K+1)
        draft_atoms = torch.cat([torch.where(mapped, draft_lp, -math.inf),
                                 draft_rest.unsqueeze(-1)], -1)  # (n, K+1)
        terms = _mass_terms(target_atoms, draft_atoms, divergence, beta)
    else:
        counts = target.counts.to(logits.dtype)  # (n, K)
        log_draws = counts.sum(-1, keepdim=True).clamp_min(1.0).log()  # (n, 1)
        rest_count = torch.where(mapped, 0.0, counts).sum(-1, keepdim=True)  # (n, 1)
        log_weight = torch.cat([
            torch.where(mapped & (counts > 0), counts.log() - log_draws, -math.inf),
            torch.where(rest_count > 0, rest_count.log() - log_draws, -math.inf)], -1)
        # the rest atom's target mass: its share of the draws (the cache has no better)
        rest_ratio = (logits[:, rest:] - lse) - (rest_count.clamp_min(1.0).log() - log_draws)
        log_ratio = torch.cat([draft_lp - target_lp, rest_ratio], -1)  # (n, K+1)
        terms = _weighted_terms(log_weight, log_ratio, divergence, beta)
    return terms.sum(-1)


def dense_restricted_divergence(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    ids: torch.Tensor,
    divergence: str = "fkl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence of a reduced-vocabulary draft against the dense target, both over
    the map's N ids and the rest (the online counterpart of `restricted_divergence`).

    Args:
        draft_logits: (N_tok, N + 1) float: the mapped ids' logits, then the rest logit.
        target_logits: (N_tok, V) float full-vocabulary target logits.
        ids: (N,) int64 the map's vocabulary ids, in the draft's row order.

    Returns:
        (N_tok,) float32 (float64 for float64 inputs) divergence per token.
    """
    _check_divergence(divergence, beta)
    target_lp = torch.log_softmax(_upcast(target_logits), dim=-1)  # (n, V)
    rest = torch.ones(target_lp.shape[-1], dtype=torch.bool, device=target_lp.device)
    rest[ids] = False
    coarse = torch.cat([target_lp[:, ids],
                        torch.logsumexp(target_lp[:, rest], -1, keepdim=True)], -1)  # (n, N+1)
    draft_lp = torch.log_softmax(_upcast(draft_logits), dim=-1)  # (n, N+1)
    return _mass_terms(coarse, draft_lp, divergence, beta).sum(-1)


def _chunk_divergence(
    draft_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    target: SparseTarget,
    divergence: str,
    beta: float,
    to_draft: torch.Tensor | None = None,
) -> torch.Tensor:
    """One checkpointed chunk: (n, H) hidden -> (n, V) logits -> (n,) divergences."""
    logits = F.linear(draft_hidden, lm_head_weight, lm_head_bias)  # (n, V) or (n, N+1)
    if to_draft is not None:
        return restricted_divergence(logits, target, to_draft, divergence, beta)
    return sparse_divergence(logits, target, divergence, beta)


def sparse_divergence_chunked(
    draft_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target: SparseTarget,
    divergence: str = "fkl",
    beta: float = 0.5,
    chunk_tokens: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    to_draft: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sparse_divergence(draft_hidden @ lm_head_weight.T, target)` with bounded memory.

    Logits are made chunk_tokens rows at a time inside `torch.utils.checkpoint`, so only one
    chunk's (chunk_tokens, V) logits exist at once, in the forward and in the backward (which
    recomputes each chunk); what is saved between them is the hidden states. Values and
    gradients equal the unchunked computation.

    Args:
        draft_hidden: (N, H) float, the draft's final hidden states at the N label tokens.
        lm_head_weight: (V', H) float, the draft's output embedding.
        target: the cached entries of the same N label tokens.
        divergence: one of DIVERGENCES.
        beta: the "jsd" mixing weight of the target (TRL convention), in [0, 1].
        chunk_tokens: label tokens per chunk, >= 1.
        lm_head_bias: (V',) float or None.
        vocab_size: keep only the first vocab_size logits (drop the lm_head's padding rows).
        to_draft: (V,) int64 for a reduced-vocabulary head (N + 1 rows: the token map's ids,
            then the rest): `restricted_divergence` instead of `sparse_divergence`.

    Returns:
        (N,) float32 (float64 for float64 inputs) divergence per token. The matmul runs in the
        inputs' dtype, as the draft's own lm_head would; the divergence in float32.
    """
    _check_divergence(divergence, beta)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if draft_hidden.dim() != 2 or draft_hidden.shape[0] != len(target):
        raise ValueError(
            f"draft_hidden {tuple(draft_hidden.shape)} must be (N, H) with N = {len(target)} "
            "cached label tokens"
        )
    if vocab_size is not None and to_draft is None:
        lm_head_weight = lm_head_weight[:vocab_size]  # (V, H)
        lm_head_bias = None if lm_head_bias is None else lm_head_bias[:vocab_size]  # (V,)
    n_tokens = draft_hidden.shape[0]
    if n_tokens == 0:
        return _chunk_divergence(
            draft_hidden, lm_head_weight, lm_head_bias, target, divergence, beta, to_draft
        )
    chunks = []
    for start in range(0, n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, n_tokens)
        chunks.append(
            checkpoint(
                _chunk_divergence,
                draft_hidden[start:stop],
                lm_head_weight,
                lm_head_bias,
                target.rows(start, stop),
                divergence,
                beta,
                to_draft,
                use_reentrant=False,
            )
        )
    return torch.cat(chunks)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values[mask]) / max(mask.sum(), 1): 0.0 (not NaN) when nothing is selected.

    Masked-out entries contribute neither value nor gradient, even if they are inf or NaN.

    Args:
        values: (...) float.
        mask: (...) bool, same shape.

    Returns:
        () float32 (float64 for float64 values).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match values {tuple(values.shape)}")
    values = _upcast(values)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)
