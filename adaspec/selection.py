"""Which label tokens the draft learns from: AdaSPEC selection, SpecKD gating, loss reduction.

AdaSPEC (Hu et al., NeurIPS 2025; github.com/yuezhouhu/adaspec) first distils a reference model
from the target with plain KD, then trains the draft only on the tokens the reference found
easiest to learn relative to the draft: delta = draft_loss - ref_loss, and the fraction k of
tokens with the largest delta is kept. The official `compute_loss` takes the threshold within
each micro-batch, `delta >= torch.quantile(delta, 1 - k)`; a dataset-wide threshold from
`global_threshold` is the alternative.
"""

import math

import torch

RULES = ("adaspec", "speckd")  # which tokens a draft with k < 1 learns from
THRESHOLDS = ("batch", "global")  # where AdaSPEC's quantile is taken
NORMALIZERS = ("all", "selected")  # what the summed loss of the kept tokens is divided by

# torch.quantile refuses inputs with more elements than this.
_TORCH_QUANTILE_MAX_NUMEL = 2**24


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k={k!r} is the fraction of tokens kept; use 0 < k <= 1 (1.0 keeps all)")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _quantile(values: torch.Tensor, q: float, ignore_nan: bool = False) -> torch.Tensor:
    """`torch.quantile(values, q)` (linear interpolation) without its 2**24-element limit.

    Above the limit, the two order statistics come from `torch.kthvalue` and are interpolated
    with the same arithmetic as torch (rank q * (n - 1) in the values' dtype, then `lerp`).
    `ignore_nan` takes the quantile of the non-NaN values (`torch.nanquantile`).

    Args:
        values: (n,) float32/float64, n >= 1.

    Returns:
        () same dtype; NaN if any value is NaN (as torch.quantile) or, with ignore_nan, if all
        are.
    """
    if values.numel() <= _TORCH_QUANTILE_MAX_NUMEL:
        return torch.nanquantile(values, q) if ignore_nan else torch.quantile(values, q)
    if ignore_nan:
        values = values[~torch.isnan(values)]
        if values.numel() == 0:
            return values.new_tensor(math.nan)
    elif torch.isnan(values).any():
        return values.new_tensor(math.nan)
    last = values.numel() - 1
    rank = torch.tensor(q, dtype=values.dtype) * last  # ()
    below = min(int(rank.long()), last)
    above = min(int(rank.ceil().long()), last)
    weight = rank - rank.long()  # ()
    value_below = torch.kthvalue(values, below + 1).values
    value_above = value_below if above == below else torch.kthvalue(values, above + 1).values
    return torch.lerp(value_below, value_above, weight.to(values.device))


def adaspec_select(
    draft_loss: torch.Tensor,
    ref_loss: torch.Tensor,
    k: float,
    threshold: str | float | torch.Tensor = "batch",
) -> torch.Tensor:
    """AdaSPEC token selection: keep the tokens whose delta = draft_loss - ref_loss is largest.

    threshold="batch" is the official rule: keep delta >= torch.quantile(delta, 1 - k) over this
    micro-batch (linear interpolation). With N distinct deltas that keeps exactly
    N - ceil((1 - k) * (N - 1)) tokens (at least 1); ties at the threshold are all kept.
    A float threshold (e.g. from `global_threshold`) keeps delta >= threshold instead.
    k = 1.0 keeps every token (plain KD: the DistillSpec baseline and the reference stage),
    whatever the threshold. A NaN delta (a caller marks a non-finite loss so) is never kept and
    takes no part in the quantile: the rule then runs over the other tokens.

    Args:
        draft_loss: (N,) float per-label-token divergence of the draft (detached here).
        ref_loss: (N,) float per-label-token divergence of the reference model.
        k: fraction of tokens to keep, 0 < k <= 1.
        threshold: "batch", or a precomputed threshold on delta.

    Returns:
        (N,) bool, True for the tokens to train on. N = 0 gives an empty mask.
    """
    _check_k(k)
    if draft_loss.dim() != 1 or draft_loss.shape != ref_loss.shape:
        raise ValueError(
            f"draft_loss {tuple(draft_loss.shape)} and ref_loss {tuple(ref_loss.shape)} must "
            "both be (N,)"
        )
    if isinstance(threshold, str) and threshold != "batch":
        raise ValueError(f"threshold={threshold!r}: use 'batch' or a float threshold on delta")
    delta = (_upcast(draft_loss) - _upcast(ref_loss)).detach()  # (N,)
    if k == 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    if delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    cut = _quantile(delta, 1.0 - k, ignore_nan=True) if isinstance(threshold, str) else threshold
    return delta >= cut  # NaN >= cut is False


def global_threshold(deltas: torch.Tensor, k: float) -> torch.Tensor | float:
    """The batch rule's threshold over a whole-dataset sample of delta = draft_loss - ref_loss.

    Returns torch.quantile(deltas, 1 - k) (linear interpolation, any size) as a () tensor on the
    deltas' device (no host sync), to pass as `adaspec_select(..., threshold=...)`; NaN deltas
    (non-finite losses) are left out. -inf for k = 1.0 so that every token is kept.

    Args:
        deltas: (M,) float (any shape is flattened), M >= 1.
        k: fraction of tokens to keep, 0 < k <= 1.
    """
    _check_k(k)
    if k == 1.0:
        return -math.inf
    deltas = _upcast(deltas.detach()).flatten()  # (M,)
    if deltas.numel() == 0:
        raise ValueError("global_threshold needs at least one delta; got an empty tensor")
    return _quantile(deltas, 1.0 - k, ignore_nan=True)


def speckd_gate(
    draft_logits_or_argmax: torch.Tensor, target_top1_ids: torch.Tensor
) -> torch.Tensor:
    """SpecKD-style gate: keep a token when the draft's greedy proposal is the target's top-1.

    SpecKD (Huang, Song, Zhang, Ren 2025, "SpecKD: Speculative Decoding for Effective Knowledge
    Distillation of LLMs", arXiv:2510.24021) applies the distillation loss only to tokens whose
    student proposal is "accepted" when verified against the teacher's distribution, masking
    (or down-weighting) the rejected ones. The paper describes greedy and non-greedy top-k
    verification; we could read only its abstract and summaries, not its exact formulas. What
    is implemented is the greedy, top-1 case: proposal = draft argmax, accepted iff it equals
    the target's argmax, i.e. what greedy speculative verification accepts. Not implemented:
    top-k > 1 acceptance, sampled proposals, down-weighting rejected tokens. (The earlier
    "Speculative Knowledge Distillation" of Xu et al., ICLR 2025, is a different method: the
    teacher replaces poorly ranked student tokens while generating training data; it does not
    gate the loss.)

    Args:
        draft_logits_or_argmax: (N, V) float draft logits, or (N,) int64 draft argmax ids.
        target_top1_ids: (N,) int target argmax ids (the cache's first top-k id).

    Returns:
        (N,) bool, True where the draft's proposal would be accepted.
    """
    proposal = draft_logits_or_argmax
    if proposal.is_floating_point():
        proposal = proposal.argmax(dim=-1)  # (N,)
    if proposal.shape != target_top1_ids.shape:
        raise ValueError(
            f"draft proposals {tuple(proposal.shape)} and target_top1_ids "
            f"{tuple(target_top1_ids.shape)} must both be (N,)"
        )
    return proposal == target_top1_ids


def select(
    rule: str,
    k: float,
    draft_loss: torch.Tensor,
    ref_loss: torch.Tensor | None = None,
    draft_argmax: torch.Tensor | None = None,
    target_top1: torch.Tensor | None = None,
    threshold: str | float | torch.Tensor = "batch",
) -> torch.Tensor:
    """The tokens a draft learns from, for every rule, as one function.

    k = 1 keeps every token (the reference, SFT and plain-KD drafts); below it, "adaspec" keeps
    the top k of delta = draft_loss - ref_loss (`adaspec_select`, `threshold` as there) and
    "speckd" keeps tokens whose draft argmax is the target's top-1 (`speckd_gate`). A
    non-finite draft loss (NaN or inf: a diverged draft, an emptied target row marked so by the
    caller) is never kept and takes no part in AdaSPEC's quantile. No host sync.

    Args:
        rule: one of RULES (ignored at k = 1).
        k: fraction kept, 0 < k <= 1.
        draft_loss: (N,) float per-token loss of the draft (detached here).
        ref_loss: (N,) float, for "adaspec".
        draft_argmax, target_top1: (N,) int64, for "speckd".

    Returns:
        (N,) bool.
    """
    _check_k(k)
    loss = draft_loss.detach()
    finite = torch.isfinite(loss)  # (N,) bool
    if k == 1.0:
        return finite
    if rule == "adaspec":
        if ref_loss is None:
            raise ValueError("rule adaspec needs ref_loss")
        ranked = torch.where(finite, _upcast(loss), math.nan)  # NaN: out of the quantile
        return adaspec_select(ranked, ref_loss, k, threshold) & finite
    if rule == "speckd":
        if draft_argmax is None or target_top1 is None:
            raise ValueError("rule speckd needs draft_argmax and target_top1")
        return speckd_gate(draft_argmax, target_top1) & finite
    raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")


def reduce_loss(
    per_token_loss: torch.Tensor,
    selected: torch.Tensor,
    label_mask_count: int | float | torch.Tensor,
    normalize: str = "all",
) -> torch.Tensor:
    """The scalar training loss from per-token losses and a selection mask.

    normalize="all": sum over selected / label_mask_count, as the official AdaSPEC code with
    num_items_in_batch (the number of label tokens, over the whole accumulated batch when
    accumulating gradients; with accelerate's average_tokens_across_devices the official code
    also multiplies by the number of processes: pass the global count / num_processes).
    normalize="selected": mean over the selected tokens (paper Eq. 10).
    Nothing selected gives 0 (no NaN); unselected entries get no gradient even if inf or NaN.

    Args:
        per_token_loss: (N,) float.
        selected: (N,) bool.
        label_mask_count: number of label tokens to divide by ("all"); values below 1 count as 1.
        normalize: "all" or "selected".

    Returns:
        () float32 (float64 for float64 losses).
    """
    if selected.dtype != torch.bool:
        raise TypeError(f"selected must be a bool tensor, got {selected.dtype}")
    if selected.shape != per_token_loss.shape:
        raise ValueError(
            f"selected {tuple(selected.shape)} must match per_token_loss "
            f"{tuple(per_token_loss.shape)}"
        )
    values = _upcast(per_token_loss)
    total = torch.where(selected, values, 0.0).sum()
    if normalize == "all":
        count = torch.as_tensor(label_mask_count, dtype=values.dtype, device=values.device)
    elif normalize == "selected":
        count = selected.sum().to(values.dtype)
    else:
        raise ValueError(f"normalize={normalize!r}: use 'all' or 'selected'")
    return total / count.clamp_min(1.0)
