"""What acceptance predicts for speed: tokens per step against the cost of a step (pure math).

One speculative step drafts g tokens (g draft forwards of one token) and verifies them in one
target forward over g + 1 tokens; it emits 1 + A tokens, A the accepted drafts. In units of one
target-only decoding step (which emits one token):

    speedup(g) = E[1 + A | g] / (g * c + v(g))

c: the draft's cost per token over the target's; v(g): the target's cost of verifying g + 1
tokens over its cost of one (not 1 on a CPU: ~1.56 for g = 4 on SmolLM2 here). E[A | g] is the
sum over positions i <= g of P(A >= i), measured directly: in greedy decoding the first g
drafts do not depend on gamma, so one run at the largest gamma gives P(A >= i) for every
smaller one (`at_least`, from `SpecStats.accepted_at / drafted_at`). The i.i.d. model
(1 - a^(g+1)) / (1 - a) is beside it for comparison.
"""

from __future__ import annotations

import math


def at_least(accepted_at: list[int], drafted_at: list[int]) -> list[float]:
    """P(A >= i) for i = 1..len: accepted at position i over steps that drafted position i."""
    return [a / d if d else math.nan for a, d in zip(accepted_at, drafted_at, strict=False)]


def expected_tokens(at_least_i: list[float], gamma: int) -> float:
    """E[1 + A] tokens per step with `gamma` drafts (needs P(A >= i) for i <= gamma)."""
    if gamma > len(at_least_i):
        raise ValueError(f"acceptance measured for {len(at_least_i)} positions, not {gamma}")
    return 1.0 + math.fsum(at_least_i[:gamma])


def iid_expected_tokens(alpha: float, gamma: int) -> float:
    """(1 - a^(g+1)) / (1 - a): tokens per step if every draft is accepted independently."""
    return float(gamma + 1) if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def step_cost(gamma: int, draft_cost: float, verify_cost: dict[int, float]) -> float:
    """g * c + v(g) in target-step units."""
    return gamma * draft_cost + verify_cost[gamma]


def predicted_speedups(at_least_i: list[float], draft_cost: float,
                       verify_cost: dict[int, float]) -> dict[int, float]:
    """speedup(g) for every g with both a measured acceptance and a verification cost."""
    gammas = [g for g in sorted(verify_cost) if 1 <= g <= len(at_least_i)
              and not math.isnan(at_least_i[g - 1])]
    return {g: expected_tokens(at_least_i, g) / step_cost(g, draft_cost, verify_cost)
            for g in gammas}


def best_gamma(speedups: dict[int, float]) -> int:
    """The gamma with the highest predicted speedup (the smaller one on a tie)."""
    if not speedups:
        raise ValueError("no gamma has a prediction")
    return max(sorted(speedups), key=lambda g: (speedups[g], -g))
