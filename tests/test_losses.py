"""Divergences: dense against plain float64 formulas, sparse against dense and coarse-graining."""

import math

import pytest
import torch
import torch.nn.functional as F

from adaspec.losses import (
    DIVERGENCES,
    SparseTarget,
    dense_divergence,
    dense_restricted_divergence,
    masked_mean,
    restricted_divergence,
    sparse_divergence,
    sparse_divergence_chunked,
)

# (divergence, beta): every divergence, and jsd also off-centre and at TRL's two special cases.
CASES = [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9),
         ("jsd", 0.0), ("jsd", 1.0)]
CASE_IDS = [f"{d}-{b}" for d, b in CASES]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(gen, n, v, scale=4.0, dtype=torch.float64):
    return torch.randn(n, v, generator=gen, dtype=dtype) * scale


def _reference(p, q, divergence, beta=0.5):
    """Plain float64 divergence between probability rows p, q (N, A) -> (N,)."""
    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    if divergence == "fkl" or (divergence == "jsd" and beta == 0.0):
        return kl(p, q)
    if divergence == "rkl" or (divergence == "jsd" and beta == 1.0):
        return kl(q, p)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _trl_generalized_jsd(draft_logits, target_logits, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (reduction="none"), summed over the vocabulary."""
    draft_lp = F.log_softmax(draft_logits, -1)
    target_lp = F.log_softmax(target_logits, -1)
    if beta == 0:
        jsd = F.kl_div(draft_lp, target_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(target_lp, draft_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=draft_lp.dtype)
        mix = torch.logsumexp(
            torch.stack([draft_lp + torch.log(1 - b), target_lp + torch.log(b)]), dim=0
        )
        kl_target = F.kl_div(mix, target_lp, reduction="none", log_target=True)
        kl_draft = F.kl_div(mix, draft_lp, reduction="none", log_target=True)
        jsd = beta * kl_target + (1 - beta) * kl_draft
    return jsd.sum(-1)


def _topk_target(target_logits, k):
    """Top-k cache entries with the tail mass summed directly over the complement (float64)."""
    target_logprobs = F.log_softmax(target_logits, -1)
    logprobs, ids = target_logprobs.topk(k, dim=-1)  # (N, K)
    rest = torch.ones_like(target_logprobs, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.logsumexp(target_logprobs.masked_fill(~rest, -math.inf), -1)  # (N,)
    return SparseTarget(ids=ids, logprobs=logprobs, tail_logmass=tail)


def _coarse(probs, ids):
    """(N, V) probs -> (N, K+1): the K cached atoms and the summed complement."""
    rest = torch.ones_like(probs, dtype=torch.bool).scatter(-1, ids, False)
    return torch.cat([probs.gather(-1, ids), (probs * rest).sum(-1, keepdim=True)], -1)


def _sample_target(target_logits, draws, gen):
    """Sample mode: `draws` tokens per row with replacement, packed as unique ids + counts.

    Padding gets id 0, count 0 and a junk log-prob that must be ignored.
    """
    target_logprobs = F.log_softmax(target_logits, -1)
    n, v = target_logprobs.shape
    sampled = torch.multinomial(target_logprobs.exp(), draws, replacement=True, generator=gen)
    dense_counts = torch.zeros(n, v, dtype=torch.float64).scatter_add_(
        -1, sampled, torch.ones(n, draws, dtype=torch.float64)
    )  # (N, V)
    width = int((dense_counts > 0).sum(-1).max())
    counts, ids = dense_counts.topk(width, dim=-1)  # (N, K)
    pad = counts == 0
    ids = ids.masked_fill(pad, 0)
    logprobs = target_logprobs.gather(-1, ids).masked_fill(pad, 123.0)
    return SparseTarget(ids=ids, logprobs=logprobs, counts=counts)


@pytest.mark.parametrize("divergence,beta", CASES, ids=CASE_IDS)
def test_dense_matches_plain_formulas(divergence, beta):
    gen = _gen(1)
    draft_logits, target_logits = _logits(gen, 40, 120), _logits(gen, 40, 120, scale=3.0)
    got = dense_divergence(draft_logits, target_logits, divergence, beta)
    p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
    assert got.dtype == torch.float64 and got.shape == (40,)
    torch.testing.assert_close(got, _reference(p, q, divergence, beta), rtol=1e-10, atol=1e-12)
    if divergence == "fkl":
        official = torch.nn.KLDivLoss(reduction="none")(F.log_softmax(draft_logits, -1), p)
        torch.testing.assert_close(got, official.sum(-1), rtol=1e-10, atol=1e-12)
    if divergence == "jsd":
        trl = _trl_generalized_jsd(draft_logits, target_logits, beta)
        torch.testing.assert_close(got, trl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence,beta", CASES, ids=CASE_IDS)
def test_full_topk_equals_dense_in_value_and_gradient(divergence, beta):
    gen = _gen(2)
    draft_logits = _logits(gen, 30, 90).requires_grad_()
    target_logits = _logits(gen, 30, 90, scale=5.0)
    target = _topk_target(target_logits, 90)
    assert torch.isinf(target.tail_logmass).all()
    sparse = sparse_divergence(draft_logits, target, divergence, beta)
    dense = dense_divergence(draft_logits, target_logits, divergence, beta)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    weights = torch.rand(30, generator=gen, dtype=torch.float64)
    (g_sparse,) = torch.autograd.grad((sparse * weights).sum(), draft_logits)
    (g_dense,) = torch.autograd.grad((dense * weights).sum(), draft_logits)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence,beta", CASES, ids=CASE_IDS)
def test_topk_is_the_coarse_grained_divergence_below_dense(divergence, beta):
    gen = _gen(3)
    draft_logits, target_logits = _logits(gen, 60, 200), _logits(gen, 60, 200, scale=3.0)
    for k in (1, 8, 50):
        target = _topk_target(target_logits, k)
        sparse = sparse_divergence(draft_logits, target, divergence, beta)
        p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
        coarse = _reference(_coarse(p, target.ids), _coarse(q, target.ids), divergence, beta)
        torch.testing.assert_close(sparse, coarse, rtol=1e-9, atol=1e-12)
        dense = dense_divergence(draft_logits, target_logits, divergence, beta)
        assert (sparse <= dense + 1e-12).all()  # data processing inequality
        assert (sparse < dense).any()


@pytest.mark.parametrize("divergence,beta", CASES[:5], ids=CASE_IDS[:5])
def test_sample_estimator_is_unbiased(divergence, beta):
    gen = _gen(4)
    n, v, draws, repeats = 6, 60, 64, 2000
    # A draft near the target, as in distillation: the estimator's variance grows with how far
    # the draft strays where the target is small (chi-square(q || p) for tvd and rkl).
    target_logits = _logits(gen, n, v)
    draft_logits = target_logits + 1.5 * torch.randn(n, v, generator=gen, dtype=torch.float64)
    target = _sample_target(target_logits.repeat(repeats, 1), draws, gen)  # (repeats * N, K)
    estimates = sparse_divergence(draft_logits.repeat(repeats, 1), target, divergence, beta)
    estimates = estimates.view(repeats, n)  # (repeats, N)
    dense = dense_divergence(draft_logits, target_logits, divergence, beta)
    stderr = estimates.std(0) / math.sqrt(repeats)
    assert ((estimates.mean(0) - dense).abs() <= 4 * stderr + 1e-9).all()
    assert (stderr < 0.1 * dense).all()  # the check has teeth


@pytest.mark.parametrize("mode,divergence", [("topk", "fkl"), ("topk", "tvd"), ("sample", "jsd")])
def test_chunked_equals_unchunked(mode, divergence):
    gen = _gen(5)
    n, h, v, padded = 37, 16, 70, 75
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(padded, h, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(padded, generator=gen, dtype=torch.float64).requires_grad_()
    target_logits = _logits(gen, n, v)
    if mode == "topk":
        target = _topk_target(target_logits, 9)
    else:
        target = _sample_target(target_logits, 16, gen)
    logits = (hidden @ weight.T + bias)[:, :v]  # (N, V)
    ref = sparse_divergence(logits, target, divergence)
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight, bias))
    for chunk in (1, 5, 8, 36, 100):
        got = sparse_divergence_chunked(
            hidden, weight, target, divergence, chunk_tokens=chunk, lm_head_bias=bias,
            vocab_size=v,
        )
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(got.sum(), (hidden, weight, bias))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_chunked_keeps_no_full_vocabulary_tensor_for_backward():
    gen = _gen(6)
    n, h, v = 64, 8, 300
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = torch.randn(v, h, generator=gen).requires_grad_()
    target = _topk_target(_logits(gen, n, v, dtype=torch.float32), 4)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_divergence_chunked(hidden, weight, target, "fkl", chunk_tokens=16)
    assert saved and max(saved) < n * v // 2
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_divergence(hidden @ weight.T, target, "fkl")
    assert max(saved) >= n * v  # the hook does see what plain autograd keeps


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_batch_gives_zero_without_nan(divergence):
    gen = _gen(7)
    draft_logits = _logits(gen, 12, 50).requires_grad_()
    target = _topk_target(_logits(gen, 12, 50), 5)
    per_token = sparse_divergence(draft_logits, target, divergence)
    per_token = torch.where(torch.arange(12) == 3, math.inf, per_token)  # junk where masked
    loss = masked_mean(per_token, torch.zeros(12, dtype=torch.bool))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, draft_logits)
    assert torch.isfinite(grad).all() and (grad == 0).all()
    empty = sparse_divergence(draft_logits[:0], target.rows(0, 0), divergence)
    assert empty.shape == (0,)
    assert masked_mean(empty, torch.zeros(0, dtype=torch.bool)).item() == 0.0


def test_masked_mean():
    values = torch.tensor([1.0, 2.0, 4.0, math.nan])
    mask = torch.tensor([True, False, True, False])
    assert masked_mean(values, mask).item() == 2.5
    with pytest.raises(TypeError, match="bool"):
        masked_mean(values, mask.float())


@pytest.mark.parametrize("divergence,beta", CASES, ids=CASE_IDS)
def test_zero_weight_atoms_give_finite_gradients(divergence, beta):
    gen = _gen(8)
    n, v = 10, 40
    draft_logits = _logits(gen, n, v, scale=8.0).requires_grad_()
    target_logits = _logits(gen, n, v)
    target_logits[:, :15] = -math.inf  # tokens the target never emits: p = 0 in the cache
    target = _topk_target(target_logits, v)  # K = V: tail -inf, 15 atoms with logprob -inf
    got = sparse_divergence(draft_logits, target, divergence, beta)
    p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
    torch.testing.assert_close(got, _reference(p, q.detach(), divergence, beta), rtol=1e-9,
                               atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), draft_logits)
    assert torch.isfinite(grad).all()
    # Sample mode with padding (id 0, count 0, junk log-prob) and a row of nothing at all.
    sample = _sample_target(_logits(gen, n, v), 8, gen)
    sample.counts[0] = 0
    got = sparse_divergence(draft_logits, sample, divergence, beta)
    assert got[0].item() == 0.0 and torch.isfinite(got).all()
    (grad,) = torch.autograd.grad(got.sum(), draft_logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_half_precision_inputs_give_float32(divergence):
    gen = _gen(9)
    draft_logits = _logits(gen, 20, 64, dtype=torch.float32).bfloat16().requires_grad_()
    target_logits = _logits(gen, 20, 64, dtype=torch.float32)
    target = _topk_target(target_logits, 8)
    target = SparseTarget(target.ids, target.logprobs.half(), target.tail_logmass.bfloat16())
    got = sparse_divergence(draft_logits, target, divergence)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    (grad,) = torch.autograd.grad(got.sum(), draft_logits)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    dense = dense_divergence(draft_logits, target_logits.bfloat16(), divergence)
    assert dense.dtype == torch.float32
    hidden = torch.randn(20, 8, generator=gen).bfloat16()
    weight = torch.randn(64, 8, generator=gen).bfloat16()
    chunked = sparse_divergence_chunked(hidden, weight, target, divergence, chunk_tokens=6)
    assert chunked.dtype == torch.float32


def test_bad_arguments_raise():
    gen = _gen(10)
    logits = _logits(gen, 4, 10)
    target = _topk_target(logits, 3)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        sparse_divergence(logits, target, "kl")
    with pytest.raises(ValueError, match="beta=1.5"):
        dense_divergence(logits, logits, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        SparseTarget(target.ids, target.logprobs)
    with pytest.raises(ValueError, match="exactly one"):
        SparseTarget(target.ids, target.logprobs, target.tail_logmass, torch.ones(4, 3))
    with pytest.raises(ValueError, match="N = 4"):
        sparse_divergence(logits[:3], target)
    assert target.mode == "topk" and len(target) == 4



# ---------------------------------------------------------------------------------------------
# Reduced-vocabulary drafts: N mapped ids + a rest outcome, against the target coarse-grained


def _token_map(gen, v, n):
    """(ids (n,), to_draft (v,)): n random ids of v; every other id goes to the rest (n)."""
    ids = torch.randperm(v, generator=gen)[:n].sort().values
    to_draft = torch.full((v,), n, dtype=torch.long)
    to_draft[ids] = torch.arange(n)
    return ids, to_draft


def _restricted_problem(gen, v, n_map, n, scale):
    """A token map of n_map ids of v, then (n, n_map + 1) draft and (n, v) target logits."""
    ids, to_draft = _token_map(gen, v, n_map)
    return ids, to_draft, _logits(gen, n, n_map + 1), _logits(gen, n, v, scale=scale)


def _restricted_reference(draft_logits, target_logits, ids, divergence, beta):
    """Dense float64: the target's probabilities on the map's ids and their summed rest, against
    the draft's N + 1 softmax (the plain formula of `_reference`)."""
    p = target_logits.softmax(-1)
    rest = torch.ones_like(p, dtype=torch.bool)
    rest[:, ids] = False
    p_coarse = torch.cat([p[:, ids], (p * rest).sum(-1, keepdim=True)], -1)
    return _reference(p_coarse, draft_logits.softmax(-1), divergence, beta)


@pytest.mark.parametrize("divergence,beta", CASES, ids=CASE_IDS)
def test_restricted_full_topk_equals_dense_restricted_in_value_and_gradient(divergence, beta):
    gen = _gen(11)
    v = 90
    ids, to_draft, draft_logits, target_logits = _restricted_problem(gen, v, 25, 30, scale=5.0)
    draft_logits.requires_grad_()
    got = restricted_divergence(draft_logits, _topk_target(target_logits, v), to_draft,
                                divergence, beta)
    # the same computation as a dense divergence over the N + 1 coarse-grained outcomes
    p = target_logits.softmax(-1)
    rest = torch.ones_like(p, dtype=torch.bool)
    rest[:, ids] = False
    coarse_logits = torch.cat([p[:, ids], (p * rest).sum(-1, keepdim=True)], -1).log()
    dense = dense_divergence(draft_logits, coarse_logits, divergence, beta)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        got, _restricted_reference(draft_logits, target_logits, ids, divergence, beta),
        rtol=1e-9, atol=1e-12)
    weights = torch.rand(30, generator=gen, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * weights).sum(), draft_logits)
    (g_dense,) = torch.autograd.grad((dense * weights).sum(), draft_logits)
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence,beta", CASES[:5], ids=CASE_IDS[:5])
def test_restricted_topk_is_a_lower_bound_of_the_restricted_dense(divergence, beta):
    gen = _gen(12)
    ids, to_draft, draft_logits, target_logits = _restricted_problem(gen, 200, 40, 50, scale=3.0)
    dense = _restricted_reference(draft_logits, target_logits, ids, divergence, beta)
    for k in (1, 8, 60):
        got = restricted_divergence(draft_logits, _topk_target(target_logits, k), to_draft,
                                    divergence, beta)
        assert (got <= dense + 1e-12).all()  # data processing inequality
        assert (got < dense - 1e-9).any()


def test_restricted_sample_mode_converges_and_its_fkl_gradient_is_unbiased():
    gen = _gen(13)
    v, n_map, n, draws, repeats = 60, 20, 4, 64, 3000
    ids, to_draft = _token_map(gen, v, n_map)
    target_logits = _logits(gen, n, v, scale=2.0)
    draft_logits = (torch.randn(n, n_map + 1, generator=gen, dtype=torch.float64)
                    ).requires_grad_()
    target = _sample_target(target_logits.repeat(repeats, 1), draws, gen)
    estimates = restricted_divergence(draft_logits.repeat(repeats, 1), target, to_draft, "fkl")
    dense = _restricted_reference(draft_logits, target_logits, ids, "fkl", 0.5)
    # the value: consistent (the rest's mass is estimated by its share of the draws)
    assert ((estimates.view(repeats, n).mean(0) - dense).abs() < 0.05 * dense).all()
    # the gradient: exactly unbiased for forward KL
    (g_est,) = torch.autograd.grad(estimates.view(repeats, n).mean(0).sum(), draft_logits)
    (g_dense,) = torch.autograd.grad(dense.sum(), draft_logits)
    torch.testing.assert_close(g_est, g_dense, rtol=0, atol=0.03)


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_restricted_chunked_equals_unchunked(mode):
    gen = _gen(14)
    v, n_map, hidden = 80, 30, 16
    ids, to_draft = _token_map(gen, v, n_map)
    h = torch.randn(37, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n_map + 1, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    target_logits = _logits(gen, 37, v)
    target = (_topk_target(target_logits, 8) if mode == "topk"
              else _sample_target(target_logits, 8, gen))
    whole = restricted_divergence(h @ w.T, target, to_draft, "fkl")
    chunked = sparse_divergence_chunked(h, w, target, "fkl", chunk_tokens=10, to_draft=to_draft)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(whole.sum(), (h, w))
    g2 = torch.autograd.grad(chunked.sum(), (h, w))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence,beta", CASES, ids=CASE_IDS)
def test_dense_restricted_equals_the_plain_formula(divergence, beta):
    gen = _gen(15)
    ids, _, draft_logits, target_logits = _restricted_problem(gen, 70, 20, 25, scale=3.0)
    got = dense_restricted_divergence(draft_logits, target_logits, ids, divergence, beta)
    torch.testing.assert_close(
        got, _restricted_reference(draft_logits, target_logits, ids, divergence, beta),
        rtol=1e-9, atol=1e-12)
