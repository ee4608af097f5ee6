"""AdaSPEC selection against the official compute_loss, SpecKD gating, loss reduction."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaspec import selection
from adaspec.losses import dense_divergence
from adaspec.selection import adaspec_select, global_threshold, reduce_loss, speckd_gate

IGNORE_INDEX = -100


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _official_adaspec_loss(logits, target_logits, ref_logits, labels, k, use_num_items):
    """The official AdaSPEC `compute_loss` (yuezhouhu/adaspec README) without the models.

    logits etc. are (B, T, V), already shifted to the positions that predict `labels`. The
    official code upcasts with `.float()`; float64 is kept here so the comparison can be tight.
    """
    loss_fct = torch.nn.KLDivLoss(reduction="none")
    vocab = logits.shape[-1]
    mask = labels.ne(IGNORE_INDEX).flatten().unsqueeze(-1)
    num_items_in_batch = int(labels.ne(IGNORE_INDEX).sum())
    shift_logits = torch.masked_select(logits.view(-1, vocab), mask=mask).view(-1, vocab)
    shift_target = torch.masked_select(target_logits.view(-1, vocab), mask=mask).view(-1, vocab)
    shift_ref = torch.masked_select(ref_logits.view(-1, vocab), mask=mask).view(-1, vocab)

    p = F.softmax(shift_target.double(), dim=-1)
    actual = loss_fct(F.log_softmax(shift_logits.double(), dim=-1), p).sum(dim=-1)
    ref = loss_fct(F.log_softmax(shift_ref.double(), dim=-1), p).sum(dim=-1)
    delta = actual - ref
    keep = delta >= torch.quantile(delta, 1 - k, dim=0, keepdim=True)
    if use_num_items:
        return torch.masked_select(actual, mask=keep).sum() / num_items_in_batch
    return torch.masked_select(actual, mask=keep).mean()


@pytest.mark.parametrize("k", [0.2, 0.4, 1.0])
@pytest.mark.parametrize("normalize", ["all", "selected"])
def test_reproduces_official_compute_loss(k, normalize):
    gen = _gen(11)
    b, t, v = 4, 40, 80
    target_logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 4
    ref_logits = target_logits + torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2
    draft_logits = (torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :7] = IGNORE_INDEX  # prompt
    labels[1, 30:] = IGNORE_INDEX  # padding
    official = _official_adaspec_loss(
        draft_logits, target_logits, ref_logits, labels, k, use_num_items=normalize == "all"
    )

    label_mask = labels.ne(IGNORE_INDEX)  # (B, T)
    draft_loss = dense_divergence(draft_logits[label_mask], target_logits[label_mask], "fkl")
    ref_loss = dense_divergence(ref_logits[label_mask], target_logits[label_mask], "fkl")
    selected = adaspec_select(draft_loss, ref_loss, k)
    ours = reduce_loss(draft_loss, selected, int(label_mask.sum()), normalize=normalize)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-14)
    (g_ours,) = torch.autograd.grad(ours, draft_logits)
    (g_official,) = torch.autograd.grad(official, draft_logits)
    torch.testing.assert_close(g_ours, g_official, rtol=1e-10, atol=1e-14)
    if k < 1.0:
        assert 0 < int(selected.sum()) < len(selected)


@pytest.mark.parametrize(
    "n,k",
    # (1 - k) * (N - 1) an integer (dyadic k) or far from one, so rounding cannot move it.
    [(101, 0.25), (50, 0.3), (37, 0.5), (200, 0.4), (20, 0.01), (9, 0.9), (1, 0.3), (2, 0.5)],
)
def test_keeps_the_documented_number_of_tokens(n, k):
    gen = _gen(12)
    draft_loss = torch.rand(n, generator=gen, dtype=torch.float64)
    ref_loss = torch.rand(n, generator=gen, dtype=torch.float64)
    assert (draft_loss - ref_loss).unique().numel() == n  # distinct deltas
    # Linear interpolation at rank (1 - k)(N - 1) puts the threshold at order statistic
    # ceil(rank) (0-based) or strictly below it, above every smaller delta.
    expected = n - math.ceil((1 - k) * (n - 1))
    selected = adaspec_select(draft_loss, ref_loss, k)
    assert selected.dtype == torch.bool and selected.shape == (n,)
    assert int(selected.sum()) == expected >= 1
    # and they are the tokens with the largest deltas
    delta = draft_loss - ref_loss
    assert delta[selected].min() > delta[~selected].max() if expected < n else True


def test_ties_at_the_threshold_are_all_kept():
    draft_loss = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    selected = adaspec_select(draft_loss, torch.zeros(5), 0.5)  # quantile 0.5 = 2.0
    assert selected.tolist() == [False, True, True, True, True]


def test_k_one_keeps_everything_and_bad_k_raises():
    gen = _gen(13)
    draft_loss, ref_loss = torch.randn(30, generator=gen), torch.randn(30, generator=gen)
    assert adaspec_select(draft_loss, ref_loss, 1.0).all()
    assert adaspec_select(draft_loss, ref_loss, 1.0, threshold=1e9).all()
    assert global_threshold(draft_loss - ref_loss, 1.0) == -math.inf
    for bad in (0.0, -0.2, 1.5, math.nan):
        with pytest.raises(ValueError, match="0 < k <= 1"):
            adaspec_select(draft_loss, ref_loss, bad)
        with pytest.raises(ValueError, match="0 < k <= 1"):
            global_threshold(draft_loss, bad)
    with pytest.raises(ValueError, match="threshold='dataset'"):
        adaspec_select(draft_loss, ref_loss, 0.5, threshold="dataset")
    with pytest.raises(ValueError, match=r"\(N,\)"):
        adaspec_select(draft_loss, ref_loss[:5], 0.5)


def test_empty_batch_gives_empty_mask():
    empty = torch.zeros(0)
    assert adaspec_select(empty, empty, 0.4).shape == (0,)
    assert adaspec_select(empty, empty, 0.4, threshold=0.0).dtype == torch.bool
    assert adaspec_select(empty, empty, 1.0).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        global_threshold(empty, 0.4)


def test_global_threshold_reproduces_the_batch_rule():
    gen = _gen(14)
    draft_loss = torch.rand(500, generator=gen) * 3
    ref_loss = torch.rand(500, generator=gen)
    delta = draft_loss - ref_loss
    for k in (0.1, 0.2, 0.4, 0.8):
        cut = global_threshold(delta, k)
        assert cut == torch.quantile(delta, 1 - k).item()
        batch = adaspec_select(draft_loss, ref_loss, k)
        assert torch.equal(adaspec_select(draft_loss, ref_loss, k, threshold=cut), batch)


def test_quantile_fallback_matches_torch_quantile(monkeypatch):
    gen = _gen(15)
    cases = []
    for n in (1, 2, 3, 10, 257, 1000):
        for dtype in (torch.float32, torch.float64):
            values = torch.randn(n, generator=gen, dtype=dtype)
            cases.append(values)
            cases.append(values.round())  # ties
    ks = (0.01, 0.2, 0.25, 0.4, 0.5, 0.77, 0.9)
    expected = [[torch.quantile(x, 1 - k) for k in ks] for x in cases]
    masks = [[adaspec_select(x, torch.zeros_like(x), k) for k in ks] for x in cases]
    monkeypatch.setattr(selection, "_TORCH_QUANTILE_MAX_NUMEL", 0)
    for x, want, want_masks in zip(cases, expected, masks, strict=True):
        for k, q, mask in zip(ks, want, want_masks, strict=True):
            assert global_threshold(x, k) == q.item()
            assert torch.equal(adaspec_select(x, torch.zeros_like(x), k), mask)


def test_selection_beyond_torch_quantile_limit():
    # torch.quantile raises above 2**24 elements (after sorting them, so not asked here).
    n = 2**24 + 5
    delta = torch.rand(n, generator=_gen(16))  # float32
    rank = 3 * (n - 1) // 4  # 0.75 * (n - 1), exact in float32 for this n
    cut = float(np.partition(delta.numpy(), rank)[rank])
    selected = adaspec_select(delta, torch.zeros_like(delta), 0.25)
    assert torch.equal(selected, delta >= cut)
    assert global_threshold(delta, 0.25) == cut


def test_speckd_gate_hand_made():
    draft_logits = torch.tensor(
        [
            [0.1, 2.0, -1.0, 0.0],  # argmax 1
            [3.0, 2.0, 1.0, 0.0],  # argmax 0
            [0.0, 0.0, 0.5, 0.4],  # argmax 2
            [-1.0, -2.0, -3.0, 5.0],  # argmax 3
        ]
    )
    target_top1_ids = torch.tensor([1, 2, 2, 0])
    gate = speckd_gate(draft_logits, target_top1_ids)
    assert gate.dtype == torch.bool
    assert gate.tolist() == [True, False, True, False]
    assert speckd_gate(torch.tensor([1, 0, 2, 3]), target_top1_ids).tolist() == gate.tolist()
    assert speckd_gate(draft_logits.bfloat16(), target_top1_ids.int()).tolist() == gate.tolist()
    with pytest.raises(ValueError, match="target_top1_ids"):
        speckd_gate(draft_logits, target_top1_ids[:3])


def test_reduce_loss_normalisations_and_all_masked():
    per_token = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    selected = torch.tensor([True, False, True, True])
    assert reduce_loss(per_token, selected, 8).item() == 10.0 / 8
    assert reduce_loss(per_token, selected, torch.tensor(5), "all").item() == 10.0 / 5
    assert reduce_loss(per_token, selected, 8, "selected").item() == pytest.approx(10.0 / 3)

    junk = torch.tensor([math.inf, math.nan, 1.0], requires_grad=True)
    nothing = torch.zeros(3, dtype=torch.bool)
    for normalize in ("all", "selected"):
        for count in (0, 3):
            loss = reduce_loss(junk, nothing, count, normalize)
            assert loss.item() == 0.0
            (grad,) = torch.autograd.grad(loss, junk)
            assert torch.equal(grad, torch.zeros(3))
    loss = reduce_loss(per_token.bfloat16(), selected, 4)
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match="normalize='mean'"):
        reduce_loss(per_token, selected, 4, "mean")
    with pytest.raises(TypeError, match="bool"):
        reduce_loss(per_token, selected.long(), 4)


def test_speckd_target_top1_skips_empty_slots_of_a_sampled_cache():
    """Sampled rows pad with empty slots (count 0, stored log-prob 0 > any real log-prob)."""
    from adaspec.sparse import SparseTarget, top1
    from cache_tools import schema

    ids = np.array([[5, 9, 0, 0], [3, 0, 0, 0], [7, 2, 11, 4]])
    logprobs = np.array([[-1.2, -0.4, 0, 0], [-0.01, 0, 0, 0], [-3.0, -0.2, -2.5, -4.0]],
                        dtype=np.float32)
    counts = np.array([[2, 6, 0, 0], [8, 0, 0, 0], [1, 5, 1, 1]], dtype=np.float32)
    stored_ids, values, stored_counts = schema.encode_rows(ids, logprobs, counts, "delta")
    values = schema.decode_logprobs(schema.encode_logprobs(values, "uint8q"), "uint8q")
    target = SparseTarget(ids=torch.from_numpy(schema.decode_ids(stored_ids, "delta")),
                          logprobs=torch.from_numpy(values),
                          counts=torch.from_numpy(stored_counts))
    assert top1(target).tolist() == [9, 3, 2]
