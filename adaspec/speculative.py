"""Speculative decoding with a draft and a target causal LM, one prompt at a time.

Each step the draft proposes up to `gamma` tokens autoregressively, the target scores them all in
one forward pass, and a prefix is accepted: greedily (temperature 0: a draft token is kept while it
equals the target's argmax, so the output is the target's own greedy output) or by rejection
sampling (Leviathan et al. 2023, Algorithm 1: keep x ~ q with probability min(1, p(x) / q(x)); on
the first rejection sample from norm(max(0, p - q)); if all are kept, a bonus token from p), so
the output follows the target's sampling distribution exactly. Either way the target's pass also
yields one more token, so a step emits accepted + 1 tokens.

Both models keep a transformers `DynamicCache`; after a rejection the entries of the refused
tokens are dropped with `crop(-n)` (transformers 5: a negative count removes that many tokens).
The invariant is that each cache holds a prefix of the committed tokens; the uncached rest is fed
on the next forward. `target_generate` is plain decoding with the same sampling convention: the
baseline for speed and correctness.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class SpecStats:
    """Counters of one or more speculative generations; merge them to aggregate prompts."""

    steps: int = 0
    """Target verification forward passes."""
    drafted: int = 0
    """Draft tokens proposed (gamma per step, fewer near max_new_tokens or after a drafted EOS)."""
    accepted: int = 0
    """Draft tokens accepted by the target."""
    rejected: int = 0
    """Draft tokens rejected: at most one per step, none when all drafts were accepted."""
    new_tokens: int = 0
    """Tokens emitted: accepted drafts plus one target token per step (none after a drafted EOS)."""
    accepted_at: list[int] = field(default_factory=list)
    """accepted_at[i]: steps whose draft at position i + 1 was accepted (vLLM's
    num_accepted_tokens_per_pos); accepted_at[i] / drafted_at[i] is P(i + 1 kept | drafted)."""
    drafted_at: list[int] = field(default_factory=list)
    """drafted_at[i]: steps that drafted a position i + 1."""

    def alpha(self) -> float:
        """accepted / (accepted + rejected): the AdaSPEC paper's acceptance rate (nan if none)."""
        judged = self.accepted + self.rejected
        return self.accepted / judged if judged else math.nan

    def draft_acceptance_rate(self) -> float:
        """accepted / drafted: vLLM's "draft acceptance rate" (nan if nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    def mean_accepted_length(self) -> float:
        """1 + accepted / steps: tokens per target call, vLLM/EAGLE "acceptance length"."""
        return 1.0 + self.accepted / self.steps if self.steps else math.nan

    def merge(self, other: SpecStats) -> SpecStats:
        """Field-wise sum of two counters, e.g. over prompts."""
        return SpecStats(
            steps=self.steps + other.steps,
            drafted=self.drafted + other.drafted,
            accepted=self.accepted + other.accepted,
            rejected=self.rejected + other.rejected,
            new_tokens=self.new_tokens + other.new_tokens,
            accepted_at=_add(self.accepted_at, other.accepted_at),
            drafted_at=_add(self.drafted_at, other.drafted_at),
        )


def _add(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two per-position count lists of any lengths."""
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def _eos_set(eos_token_id: int | Collection[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _model_vocab(model) -> int:
    return model.config.get_text_config().vocab_size


def _check_args(input_ids: torch.Tensor, max_new_tokens: int, temperature: float) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}; pass one non-empty prompt as (1, T)"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")


def _new_cache(model) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    # sliding-window layers otherwise drop old states before we can roll back
    cache.activate_past_recording()
    return cache


def _rollback(cache: DynamicCache, keep: int) -> None:
    """Keep the first `keep` cached positions (crop(0) still trims sliding-window layers)."""
    cache.crop(keep - cache.get_seq_length())


@functools.cache
def _forward_params(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_kwarg(model_class: type) -> str:
    """The forward argument that takes the KV cache: `cache` in newer transformers (5.24).

    5.24 renamed `past_key_values` to `cache` and warns that the old name goes in 5.40; older
    releases (5.17 on the GPU machine) only know `past_key_values` and would pass an unknown
    `cache` on through **kwargs unused, decoding without the prefix. So ask the signature.
    """
    return "cache" if "cache" in _forward_params(model_class) else "past_key_values"


def _forward(model, cache: DynamicCache, ids: torch.Tensor, n_logits: int, vocab_size: int):
    """Feed `ids` (L,) after the cached prefix; return the last logits, (n_logits, V) fp32."""
    kwargs = {_cache_kwarg(type(model)): cache}
    if "logits_to_keep" in _forward_params(type(model)):
        # skip the LM head on positions whose logits we never read
        kwargs["logits_to_keep"] = n_logits
    out = model(input_ids=ids[None], use_cache=True, **kwargs)
    return out.logits[0, -n_logits:, :vocab_size].float()


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) logits -> (..., V) fp32 sampling distribution at `temperature` > 0."""
    return torch.softmax(logits / temperature, dim=-1)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _verify(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Accept a prefix of the drafts and pick the token that follows it.

    Args:
        target_logits: (D + 1, V) fp32 target logits at the D draft positions and the one after.
        draft_probs: (D, V) fp32 draft distributions the drafts were sampled from (greedy: unused).
        draft_tokens: (D,) int64 drafted ids.

    Returns:
        (n accepted drafts, next token id): the correction after a rejection, else the bonus.
    """
    d = draft_tokens.shape[0]
    if temperature == 0:
        target_tokens = target_logits.argmax(dim=-1)  # (D + 1,)
        n = int((target_tokens[:d] == draft_tokens).long().cumprod(dim=0).sum())
        return n, int(target_tokens[n])
    target_probs = _probs(target_logits, temperature)  # (D + 1, V)
    rows = torch.arange(d, device=draft_tokens.device)
    ratio = target_probs[rows, draft_tokens] / draft_probs[rows, draft_tokens]  # q(x) > 0: x ~ q
    u = torch.rand(d, generator=generator, device=ratio.device)
    n = int((u < ratio).long().cumprod(dim=0).sum())
    if n == d:
        return n, _sample(target_probs[d], generator)
    residual = (target_probs[n] - draft_probs[n]).clamp(min=0.0)
    if residual.sum() <= 0:
        # p == q up to rounding, so a rejection had probability ~0: p itself is the right law
        residual = target_probs[n]
    return n, _sample(residual, generator)


@torch.no_grad()
def _draft_tokens(draft, cache, seq: torch.Tensor, budget: int, vocab: int, temperature: float,
                  eos: set[int], generator) -> tuple[list[int], list[torch.Tensor]]:
    """Up to `budget` draft tokens after `seq` (stopping after an EOS), and at temperature > 0
    the (V,) draft distribution each was sampled from."""
    drafts: list[int] = []
    draft_rows: list[torch.Tensor] = []
    pending = seq[cache.get_seq_length() :]
    for _ in range(budget):
        logits = _forward(draft, cache, pending, 1, vocab)[0]  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            draft_rows.append(_probs(logits, temperature))
            token = _sample(draft_rows[-1], generator)
        drafts.append(token)
        pending = seq.new_tensor([token])
        if token in eos:
            break  # nothing after an EOS can be emitted, so do not draft past it
    return drafts, draft_rows


@torch.no_grad()  # else the target's cache (and every verify pass's activations) joins a graph
def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    gamma: int = 5,
    temperature: float = 0.0,
    eos_token_id: int | Collection[int] | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Generate from `target` with `draft` proposing `gamma` tokens per target call.

    Args:
        target, draft: HF causal LMs sharing a tokenizer (their vocabularies may differ only in
            padding rows past `vocab_size`).
        input_ids: (1, T) int64 prompt.
        max_new_tokens: hard cap on emitted tokens.
        gamma: draft tokens per step (>= 1); fewer when fewer tokens remain.
        temperature: 0 for greedy, else sampling from softmax(logits / temperature).
        eos_token_id: id(s) that end generation; the EOS is emitted.
        vocab_size: real vocabulary shared by both; logits are cut to it. Default: the smaller
            of the two configs' vocab_size.
        generator: torch RNG for sampling (None: the global one).

    Returns:
        ((n,) int64 new token ids on input_ids' device, SpecStats).
    """
    _check_args(input_ids, max_new_tokens, temperature)
    if gamma < 1:
        raise ValueError(f"gamma={gamma} must be >= 1; use target_generate for no drafting")
    vocab = vocab_size or min(_model_vocab(target), _model_vocab(draft))
    eos = _eos_set(eos_token_id)
    prompt_len = input_ids.shape[1]
    seq = input_ids[0].long()  # (T + n,) committed tokens
    target_cache, draft_cache = _new_cache(target), _new_cache(draft)
    stats = SpecStats()

    while seq.shape[0] - prompt_len < max_new_tokens:
        n_new = seq.shape[0] - prompt_len
        # the target pass always adds one token of its own, so draft at most remaining - 1
        budget = min(gamma, max_new_tokens - n_new - 1)

        drafts, draft_rows = _draft_tokens(draft, draft_cache, seq, budget, vocab, temperature,
                                           eos, generator)
        draft_tokens = seq.new_tensor(drafts)  # (D,)
        d = len(drafts)
        verify_ids = torch.cat([seq[target_cache.get_seq_length() :], draft_tokens])
        target_logits = _forward(target, target_cache, verify_ids, d + 1, vocab)  # (D + 1, V)
        draft_probs = torch.stack(draft_rows) if draft_rows else target_logits[:0]  # (D, V)
        n, next_token = _verify(target_logits, draft_probs, draft_tokens, temperature, generator)

        # both caches hold seq + a prefix of the drafts; keep only what was accepted
        keep = seq.shape[0] + n
        _rollback(target_cache, min(target_cache.get_seq_length(), keep))
        _rollback(draft_cache, min(draft_cache.get_seq_length(), keep))

        stats.steps += 1
        stats.drafted += d
        stats.accepted += n
        stats.rejected += int(n < d)
        stats.drafted_at = _add(stats.drafted_at, [1] * d)
        stats.accepted_at = _add(stats.accepted_at, [1] * n)
        emitted = drafts[:n]
        if not (emitted and emitted[-1] in eos):
            emitted.append(next_token)
        seq = torch.cat([seq, seq.new_tensor(emitted)])
        if emitted[-1] in eos:
            break

    new_tokens = seq[prompt_len:]
    stats.new_tokens = new_tokens.shape[0]
    return new_tokens, stats


@torch.no_grad()
def target_generate(
    target,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | Collection[int] | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Plain autoregressive decoding with a KV cache, same conventions as `speculative_generate`.

    Args:
        input_ids: (1, T) int64 prompt.

    Returns:
        (n,) int64 new token ids, n <= max_new_tokens (the EOS, if reached, is included).
    """
    _check_args(input_ids, max_new_tokens, temperature)
    vocab = vocab_size or _model_vocab(target)
    eos = _eos_set(eos_token_id)
    cache = DynamicCache(config=target.config)
    pending = input_ids[0].long()
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = _forward(target, cache, pending, 1, vocab)[0]  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = _sample(_probs(logits, temperature), generator)
        out.append(token)
        if token in eos:
            break
        pending = pending.new_tensor([token])
    return torch.tensor(out, dtype=torch.long, device=input_ids.device)


def synchronize() -> None:
    """Wait for queued GPU work, so a timer read after a run covers the run."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _CachedForward:
    """A model with `prompt` cached, timing forwards of n new tokens after it (rolled back)."""

    def __init__(self, model, prompt: torch.Tensor, vocab: int):
        self.model, self.vocab = model, vocab
        self.cache = _new_cache(model)
        seq = prompt[0].long()
        _forward(model, self.cache, seq, 1, vocab)  # the prompt, cached
        self.kept, self.token = self.cache.get_seq_length(), seq[-1:]

    def seconds(self, n_tokens: int) -> float:
        new = self.token.repeat(n_tokens)
        synchronize()
        started = time.perf_counter()
        _forward(self.model, self.cache, new, n_tokens, self.vocab)
        synchronize()
        took = time.perf_counter() - started
        _rollback(self.cache, self.kept)
        return took


@torch.no_grad()
def step_costs(target, draft, prompt: torch.Tensor, max_gamma: int, repeats: int = 7,
               vocab_size: int | None = None) -> dict:
    """This machine's costs of a speculative step, in target-step units (`adaspec.speedup`):
    the draft's per-token cost c and the target's cost v(g) of verifying g + 1 tokens, g =
    1..max_gamma. The forwards are timed in `repeats` interleaved rounds (after one untimed
    round) and each kind keeps its fastest time: another process on the machine only ever adds
    time, and interleaving exposes every kind to the same drift."""
    vocab = vocab_size or min(_model_vocab(target), _model_vocab(draft))
    big, small = _CachedForward(target, prompt, vocab), _CachedForward(draft, prompt, vocab)
    kinds = [("target", 1), ("draft", 1)] + [("target", g + 1) for g in range(1, max_gamma + 1)]
    best: dict[tuple[str, int], float] = {}
    for round_index in range(repeats + 1):
        for name, n in kinds:
            took = (big if name == "target" else small).seconds(n)
            if round_index:
                best[name, n] = min(best.get((name, n), math.inf), took)
    target_s, draft_s = best["target", 1], best["draft", 1]
    return {"target_step_s": target_s, "draft_step_s": draft_s, "draft_cost": draft_s / target_s,
            "verify_cost": {g: best["target", g + 1] / target_s
                            for g in range(1, max_gamma + 1)},
            "timing": f"fastest of {repeats} interleaved rounds"}
