"""Reduced-vocabulary drafts (--draft-vocab): the head, its folder, its training loss against a
dense float64 computation restricted the same way, and lossless speculative decoding."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers import (
    SMALL_VOCAB,
    SpeculativeSampler,
    chi2_pvalue,
    first_two_token_counts,
    first_two_token_probs,
    make_tiny_model,
    sharpen_lm_head,
    train_config,
)

from adaspec import draft_vocab, labels, models, stream
from adaspec.build import build_stage
from adaspec.errors import UserError
from adaspec.speculative import speculative_generate, target_generate
from adaspec.step import LossModel
from adaspec.train import train
from cache_tools.store import CacheReader

pytestmark = pytest.mark.usefixtures("one_thread")


def _reduced(model, ids):
    return draft_vocab.reduce_head(model, torch.tensor(ids))


@pytest.mark.parametrize("tied", [False, True])
def test_folder_round_trip_and_plain_transformers_argmax(tmp_path, tiny_tokenizer, tied):
    from transformers import AutoModelForCausalLM

    v = len(tiny_tokenizer)
    model = make_tiny_model(v, n_layers=1, seed=2)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    embed_before = model.model.embed_tokens.weight.detach().clone()
    ids = sorted(torch.randperm(v, generator=torch.Generator().manual_seed(0))[:40].tolist())
    _reduced(model, ids)
    head = draft_vocab.reduced_head_of(model)
    assert head.weight.shape == (41, 32) and head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        head.weight.add_(0.5 * torch.randn_like(head.weight))  # "trained"
    torch.testing.assert_close(model.model.embed_tokens.weight, embed_before)
    models.save_model(model, tiny_tokenizer, tmp_path / "m")
    assert not json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"]
    loaded, _ = models.load_model(str(tmp_path / "m"))
    again = draft_vocab.reduced_head_of(loaded)
    torch.testing.assert_close(again.weight, head.weight, rtol=0, atol=0)
    assert again.ids.tolist() == ids
    inputs = torch.randint(0, v, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=inputs).logits  # (3, 9, V): -inf outside the map
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=inputs).logits
    assert torch.isinf(ours[..., [i for i in range(v) if i not in ids]]).all()
    torch.testing.assert_close(plain[..., ids], ours[..., ids], rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.argmax(-1), ours.argmax(-1))  # unmapped rows never win


def test_token_map_takes_the_most_mass_plus_specials(env, tmp_path):
    reader = CacheReader(str(env.cache), "gsm8k", "train")
    mass = torch.zeros(reader.vocab_size, dtype=torch.float64)
    rows = reader.target_rows(0, reader.n_label_rows)
    for i, lp in zip(rows["ids"].reshape(-1), rows["logprobs"].reshape(-1), strict=True):
        mass[int(i)] += math.exp(float(lp))
    ids = draft_vocab.token_map(reader, 10, [0])
    top = set(torch.argsort(-mass, stable=True)[:10].tolist())
    assert set(ids.tolist()) == top | {0} and list(ids) == sorted(ids)
    with pytest.raises(UserError, match="--draft-vocab"):
        draft_vocab.token_map(reader, 0, [])


def test_training_loss_equals_dense_float64_restricted(env):
    """The K = V cache's loss for a reduced draft equals the divergence computed densely in
    float64 between the target's distribution coarse-grained onto the map + rest and the
    draft's N + 1 softmax."""
    reader = CacheReader(str(env.cache), "gsm8k", "train")
    ids = draft_vocab.token_map(reader, 20, [0])
    draft, _ = models.load_model(f"{env.target}@layers=1")
    _reduced(draft, ids)
    s = stream.BatchStream(reader, 4, 0, 0, with_target=True)
    batch = next(s.batches())
    # the cached (float16-rounded) target distribution, dense: K = V holds every id
    t = batch.target
    assert torch.isinf(t.tail_logmass).all()
    target_logits = torch.full((len(t), reader.vocab_size), -math.inf, dtype=torch.float64)
    target_logits.scatter_(-1, t.ids.long(), t.logprobs.double())
    for divergence in ("fkl", "tvd"):
        loss_model = LossModel(draft, reader.vocab_size, divergence, 0.5, 7)
        with torch.no_grad():
            got, _ = loss_model(batch, batch.target)
        head = draft_vocab.reduced_head_of(draft)
        hidden = labels.label_hidden(draft, batch).double()
        q = torch.softmax(hidden @ head.weight.double().T, -1)  # (N, n + 1)
        p = target_logits.exp()  # the cached values as they are (not renormalised)
        rest = torch.ones(p.shape[-1], dtype=torch.bool)
        rest[torch.as_tensor(ids)] = False
        p = torch.cat([p[:, ids], p[:, rest].sum(-1, keepdim=True)], -1)
        dense = (p * (p.log() - q.log())).sum(-1) if divergence == "fkl" \
            else 0.5 * (p - q).abs().sum(-1)
        torch.testing.assert_close(got.double(), dense, rtol=1e-4, atol=1e-5)


def test_reduced_ref_and_adaspec_draft_end_to_end(env, tmp_path):
    cache = tmp_path / "cache"
    build_stage(train_config(env, {"cache": str(cache)}), "target", progress=False)
    ref = train(train_config(env, {"cache": str(cache)}, stage="ref", epochs=1, lr=1e-3,
                             draft_vocab=24, out=tmp_path / "ref"), progress=False)
    saved = draft_vocab.read_map(ref / "model")
    assert saved is not None and 24 <= saved["n"] <= 25  # + the EOS id if not among the 24
    build_stage(train_config(env, {"cache": str(cache)}), "ref", progress=False)
    reader = CacheReader(str(cache), "gsm8k", "train")
    losses = reader.ref_losses("ref", "fkl", 0, reader.n_label_rows)
    assert losses.shape[0] > 0 and torch.isfinite(torch.as_tensor(losses)).all()
    draft = train(train_config(env, {"cache": str(cache)}, k=0.5, epochs=1, draft_vocab=24,
                               out=tmp_path / "draft"), progress=False)
    assert draft_vocab.read_map(draft / "model")["ids"] == saved["ids"]
    metrics = [json.loads(x) for x in (draft / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in metrics if "loss" in r)
    assert yaml.safe_load((draft / "config.yaml").read_text())["train"]["draft_vocab"] == 24
    with pytest.raises(UserError, match="token map"):  # a full-vocabulary draft vs reduced ref
        train(train_config(env, {"cache": str(cache)}, k=0.5, epochs=1, out=tmp_path / "full"),
              progress=False)
    with pytest.raises(UserError, match="token map"):  # another N
        train(train_config(env, {"cache": str(cache)}, k=0.5, epochs=1, draft_vocab=12,
                           out=tmp_path / "other"), progress=False)


def test_sft_with_draft_vocab_is_refused(env, tmp_path):
    with pytest.raises(UserError, match="--draft-vocab"):
        train_config(env, stage="sft", draft_vocab=10, out=tmp_path / "x")


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_online_reduced_runs_give_the_cached_losses(env, tmp_path, k):
    """K = V cache: the online (dense) and cached restricted losses, with a reduced reference
    for AdaSPEC, give the same training run (the dense pair of the study)."""
    cache = tmp_path / "cache"
    build_stage(train_config(env, {"cache": str(cache)}), "target", progress=False)
    ref = train(train_config(env, {"cache": str(cache)}, stage="ref", epochs=1, lr=1e-3,
                             draft_vocab=24, out=tmp_path / "ref"), progress=False)
    build_stage(train_config(env, {"cache": str(cache)}), "ref", progress=False)
    runs = {}
    for online in (False, True):
        runs[online] = train(train_config(env, {"cache": str(cache)}, ref=str(ref / "model"), k=k,
                                          epochs=1, draft_vocab=24, online=online,
                                          out=tmp_path / f"d{online}"), progress=False)
    cached, live = ([json.loads(x) for x in (runs[o] / "metrics.jsonl").read_text().splitlines()]
                    for o in (False, True))
    # The same losses up to float summation order (dense and restricted paths differ in it).
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in live], rel=1e-3,
                                                        abs=1e-4)
    assert [r["selected_fraction"] for r in cached] == [r["selected_fraction"] for r in live]


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_speculative_greedy_with_reduced_draft_equals_target_greedy(gamma):
    v = 64
    target = make_tiny_model(v, n_layers=2, seed=0)
    draft = make_tiny_model(v, n_layers=2, seed=0)  # the target's own weights: high acceptance
    ids = list(range(0, v, 2))  # half of the vocabulary
    _reduced(draft, ids)
    for prompt in ([1, 2, 3], [5, 9, 11, 40, 7]):
        x = torch.tensor([prompt])
        out, stats = speculative_generate(target, draft, x, 12, gamma, 0.0)
        plain = target_generate(target, x, 12, 0.0)
        assert out.tolist() == plain.tolist()
        assert stats.accepted > 0  # mapped proposals were accepted


def test_speculative_sampling_with_reduced_draft_follows_the_target():
    target = sharpen_lm_head(make_tiny_model(SMALL_VOCAB, n_layers=2, seed=0), 10.0)
    draft = sharpen_lm_head(make_tiny_model(SMALL_VOCAB, n_layers=2, seed=0), 10.0)
    _reduced(draft, [0, 2, 3, 5, 6])  # ids 1, 4, 7 can only come from the target's correction
    prompt, temperature, runs = [1, 2, 3], 0.8, 1000
    ids = torch.tensor([prompt])
    probs = first_two_token_probs(target, prompt, temperature)
    spec = SpeculativeSampler(target, draft, ids, temperature, torch.Generator().manual_seed(0))
    counts = first_two_token_counts(spec, runs)
    assert chi2_pvalue(counts, probs) > 1e-3
    assert 0.1 < spec.stats.alpha() < 0.95
    unmapped_first = sum(int(counts[a * SMALL_VOCAB:(a + 1) * SMALL_VOCAB].sum())
                         for a in (1, 4, 7))
    assert unmapped_first > 0  # the target still emits ids outside the map
