"""The decision rule of the AdaSPEC-versus-control studies, fixed before running, and its
sentences (not a study: the converged study and the small study's page both use it).

A beats C only if A - C > 0 in every seed and the seed-level 95% t-interval of A - C on the
headline measure excludes 0, with C's validation curve flat at its end in every seed; C beats A
if A - C < 0 in every seed and the interval lies below 0 (a C still improving would only widen
that gap); otherwise no difference is shown.
"""

from __future__ import annotations

import dataclasses
import math

from adaspec.statistics import t_quantile


@dataclasses.dataclass(frozen=True)
class Decision:
    outcome: str  # "A beats C", "C beats A", "no difference shown" or "no result yet"
    seeds: int  # the seeds with every main arm
    positive_every_seed: bool = False
    negative_every_seed: bool = False
    interval_above_zero: bool = False
    interval_below_zero: bool = False
    control_plateaued: bool = False  # C's validation curve flat at its end in every seed
    complete: bool = False  # the planned 3 seeds are in


# How each part of the rule reads in a doc.
PART_LABELS = {"positive_every_seed": "A-C positive in every seed",
               "negative_every_seed": "A-C negative in every seed",
               "interval_above_zero": "interval above 0",
               "interval_below_zero": "interval below 0",
               "control_plateaued": "C plateaued in every seed"}


def decide(a_minus_c: dict | None, control_plateaus: list[bool]) -> Decision:
    """The rule on A - C's headline row (`per_seed`, `n`, `low`, `high`; None: no seed has R, A
    and C yet) and C's plateau flag per seed."""
    if a_minus_c is None:
        return Decision("no result yet", 0)
    n = a_minus_c["n"]
    positive = all(v > 0 for v in a_minus_c["per_seed"])
    negative = all(v < 0 for v in a_minus_c["per_seed"])
    above = n >= 2 and a_minus_c["low"] > 0
    below = n >= 2 and a_minus_c["high"] < 0
    flat = bool(control_plateaus) and all(control_plateaus)
    if positive and above and flat:
        outcome = "A beats C"
    elif below and negative:
        outcome = "C beats A"
    else:
        outcome = "no difference shown"
    return Decision(outcome, n, positive, negative, above, below, flat, n >= 3)


def parts_sentence(decision: dict) -> str:
    """"The rule's parts: ..." from a stored decision (a `Decision` as a dict)."""
    return "The rule's parts: " + ", ".join(f"{label}: {decision[name]}"
                                            for name, label in PART_LABELS.items()) + "."


def verdict_sentence(summary: dict, headline: str) -> str:
    """The decision in one sentence with its numbers (a study's `summary`: its stored
    `decision` and the `comparisons` it was made from)."""
    d = summary["decision"]
    ac = summary.get("comparisons", {}).get("A - C", {}).get(headline)
    if ac is None:
        return "no seed has finished yet."
    n = ac["n"]
    if n >= 2:
        size = (f"{ac['mean'] * 100:+.2f} pt, 95% t-interval [{ac['low'] * 100:+.2f}, "
                f"{ac['high'] * 100:+.2f}]")
    else:
        size = f"{ac['mean'] * 100:+.2f} pt, one seed"
    seeds = ", ".join(f"{v * 100:+.2f}" for v in ac["per_seed"])
    return (f"**{d['outcome']}** after {n} seed(s){'' if d.get('complete') else ' (incomplete)'}"
            f": AdaSPEC minus the compute-matched control in greedy agreement on the test "
            f"continuations {size} (per seed {seeds}); the control's validation curve flat at "
            f"its end in every seed: {'yes' if d['control_plateaued'] else 'no'}.")


def seeds_needed(sd: float, half_width: float, most: int = 1000) -> int | None:
    """The fewest seeds whose 95% t-interval of a mean has a half-width <= `half_width` when the
    seed-to-seed standard deviation is `sd` (None: more than `most`)."""
    if not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    for n in range(2, most + 1):
        if t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def power_sentence(row: dict, name: str = "A - C", difference: float = 0.01) -> str | None:
    """How many seeds would resolve a `difference` (1 pt) at the observed seed-to-seed spread
    of `row` (a comparison's `per_seed` values): the seeds for the 95% t-interval's half-width
    to shrink to it (a true difference of that size then lies just outside 0 on average;
    about 2x as many give 80% power). None with fewer than 2 seeds."""
    values = row["per_seed"]
    if len(values) < 2:
        return None
    sd = row["sd"]
    n = seeds_needed(sd, difference)
    need = f"{n} seeds" if n is not None else "more than 1000 seeds"
    return (f"Power: the seed-to-seed standard deviation of {name} is {sd * 100:.2f} pt over "
            f"{len(values)} seeds; a 95% t-interval of half-width {difference * 100:g} pt "
            f"(what resolving a {difference * 100:g}-pt difference takes) needs {need}.")
