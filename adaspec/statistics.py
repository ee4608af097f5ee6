"""The statistics of evaluations (pure math): seed-level Student t intervals, speed summaries over
interleaved rounds, paired differences of drafts, and the accepted lengths acceptance predicts.

A per-token (clustered) standard error holds the trained models fixed; a claim about a training
method needs the spread over independently trained models. With n seeds, the seed-level
interval is mean ± t_{n-1, (1+c)/2} * sd / sqrt(n), where sd is the sample standard deviation
of the per-seed values. No scipy here: the t distribution's CDF is the regularized incomplete
beta function, evaluated by its continued fraction (Lentz), and the quantile found by bisection.
"""

from __future__ import annotations

import math

import torch

from adaspec.speedup import iid_expected_tokens


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, ~1e-15)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection on `t_cdf`."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def t_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Seed-level mean, sample standard deviation, standard error and the two-sided t-interval
    (df = n - 1) of per-seed `values`; with fewer than two values the spread is NaN."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "se": math.nan, "t": math.nan,
                "low": math.nan, "high": math.nan, "confidence": confidence}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    t = t_quantile((1.0 + confidence) / 2.0, n - 1)
    return {"n": n, "mean": mean, "sd": sd, "se": se, "t": t, "low": mean - t * se,
            "high": mean + t * se, "confidence": confidence}


# ---------------------------------------------------------------------------------------------
# Speed summaries over interleaved rounds


def median(values: list[float]) -> float:
    """The median (the mean of the two middle values for an even count); nan for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def summarize_speed(
    spec_tokens: list[int], spec_seconds: list[float], target_tokens: list[int],
    target_seconds: list[float],
) -> dict:
    """Per-round totals of one draft's speculative runs and of the target-only runs -> speeds.

    Each path's tokens/s is a median over rounds with its min and max, and the speedup is the
    median of per-round ratios: a round's two paths ran interleaved on the same prompts, so a
    slow phase of the machine hits both and cancels in the ratio. `speedup_spread` is the
    half-width of the smallest interval centred on the median that holds every round's ratio;
    `median ± spread` is what tables print and what `speed_within_noise` compares.
    """
    def rates(tokens, seconds):
        return [n / s if s > 0 else float("nan") for n, s in zip(tokens, seconds, strict=True)]

    spec, target = rates(spec_tokens, spec_seconds), rates(target_tokens, target_seconds)
    ratios = [a / b if b > 0 else float("nan") for a, b in zip(spec, target, strict=True)]
    speedup = median(ratios)
    low, high = (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))
    return {
        "speculative_tokens_per_s": median(spec),
        "speculative_tokens_per_s_min": min(spec, default=float("nan")),
        "speculative_tokens_per_s_max": max(spec, default=float("nan")),
        "target_tokens_per_s": median(target),
        "target_tokens_per_s_min": min(target, default=float("nan")),
        "target_tokens_per_s_max": max(target, default=float("nan")),
        "speedup": speedup,
        "speedup_min": low,
        "speedup_max": high,
        "speedup_spread": max(speedup - low, high - speedup),
        "speed_rounds": len(ratios),
    }


def speed_within_noise(speedups: list[tuple[float, float]]) -> list[bool]:
    """(median speedup, spread) per draft -> whether its interval overlaps another draft's.

    A draft whose `median ± spread` overlaps another's cannot be ranked against it by speed
    from this run; with one draft there is nothing to rank, so the flag is False.
    """
    flags = []
    for i, (m_i, s_i) in enumerate(speedups):
        flags.append(any(abs(m_i - m_j) <= s_i + s_j
                         for j, (m_j, s_j) in enumerate(speedups) if j != i))
    return flags


# ---------------------------------------------------------------------------------------------
# Paired differences of drafts on the same tokens and prompts, and what acceptance predicts


def clustered_difference(a: list[list[float]], b: list[list[float]], lengths: list[int]
                         ) -> tuple[float, float]:
    """Mean of a - b over the same tokens and its standard error clustered by sequence.

    a, b: per run (seeds, or a single run), per-token values in sequence order; `lengths`:
    tokens per sequence, the same sequences in every run. Tokens of one sequence are not
    independent, so a sequence's tokens over all runs form one cluster:
    se = sqrt(G / (G - 1) * sum_g (S_g - n_g * mean)^2) / N.
    """
    diffs = [torch.tensor(x, dtype=torch.float64) - torch.tensor(y, dtype=torch.float64)
             for x, y in zip(a, b, strict=True)]
    total = torch.cat(diffs)
    mean = total.mean()
    g = len(lengths)
    if g < 2:
        return float(mean), math.nan
    sums = sum(torch.stack([part.sum() for part in d.split(lengths)]) for d in diffs)
    sizes = torch.tensor(lengths, dtype=torch.float64) * len(diffs)
    return float(mean), float(torch.sqrt(g / (g - 1) * ((sums - sizes * mean) ** 2).sum())
                              / len(total))


def prompt_difference(a: list[list[dict]], b: list[list[dict]]) -> tuple[float, float]:
    """Difference of mean accepted length (1 + accepted / steps) per prompt, runs (seeds)
    pooled per prompt, and its standard error over prompts."""
    def per_prompt(runs: list[list[dict]]) -> torch.Tensor:  # (prompts,)
        accepted = torch.tensor([[p["accepted"] for p in run] for run in runs],
                                dtype=torch.float64)
        steps = torch.tensor([[p["steps"] for p in run] for run in runs], dtype=torch.float64)
        return 1.0 + accepted.sum(0) / steps.sum(0).clamp(min=1)

    diff = per_prompt(a) - per_prompt(b)
    if len(diff) < 2:
        return float(diff.mean()), math.nan
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))


COMPARED = (("exact", "expected_acceptance", "exact acceptance on answers"),
            ("exact_continuations", "greedy_agreement",
             "greedy agreement on the target's continuations"))


def compare(results: list[dict]) -> list[dict]:
    """The first draft minus each other draft, on the same tokens and prompts: teacher-forced
    measures (points, clustered by sequence) and the real mean accepted length (by prompt)."""
    out = []
    first = results[0]
    for other in results[1:]:
        row = {"draft": first["draft"], "versus": other["draft"]}
        for source, measure, label in COMPARED:
            if source in first and "per_token" in first[source]:
                a, b = first[source]["per_token"], other[source]["per_token"]
                row[label] = clustered_difference([a[measure]], [b[measure]],
                                                  a["sequence_lengths"])
        if "per_prompt" in first.get("speculative", {}):
            row["mean accepted length"] = prompt_difference(
                [first["speculative"]["per_prompt"]], [other["speculative"]["per_prompt"]])
        out.append(row)
    return out


def verdict(rows: list[dict]) -> str:
    """One line: the first draft minus each other, in the measure closest to decoding (greedy
    agreement on the target's continuations, else exact acceptance on answers), in points."""
    if not rows:
        return ""
    label = next((lab for _, _, lab in reversed(COMPARED) if lab in rows[0]), None)
    if label is None:
        return ""
    parts = [f"minus {r['versus']} {r[label][0] * 100:+.2f} ± {r[label][1] * 100:.2f} pt"
             for r in rows]
    return f"verdict ({label}): {rows[0]['draft']} " + ", ".join(parts)


def predicted_lengths(result: dict) -> dict:
    """The mean accepted length each teacher-forced measure predicts for the result's gamma:
    greedy agreement at temperature 0 (what greedy verification accepts), expected acceptance
    sum min(p, q) otherwise; beside the measured one when speculative decoding ran."""
    key = "greedy_agreement" if result["temperature"] == 0 else "expected_acceptance"
    out = {"per_token_measure": key}
    for name in ("exact", "exact_continuations"):
        if name in result:
            out[name] = iid_expected_tokens(result[name][key], result["gamma"])
    if "offline_continuations" in result and key == "greedy_agreement":
        out["offline_continuations"] = iid_expected_tokens(
            result["offline_continuations"]["greedy_agreement"], result["gamma"])
    if "speculative" in result:
        out["measured"] = result["speculative"]["mean_accepted_length"]
    return out
