"""Text for `adaspec-eval`'s results: one block per draft, a table for several, and the
paired comparison lines."""

from __future__ import annotations

import math


def format_comparison(rows: list[dict]) -> str:
    """One line per pair: the first draft minus another, points ± standard error."""
    lines = []
    for row in rows:
        parts = []
        for label, (mean, se) in ((k, v) for k, v in row.items()
                                  if k not in ("draft", "versus")):
            scale, unit = (1, "") if label == "mean accepted length" else (100, " pt")
            parts.append(f"{label} {mean * scale:+.2f} ± {se * scale:.2f}{unit}")
        lines.append(f"{row['draft']} minus {row['versus']}: " + "; ".join(parts))
    return "\n".join(lines)



def format_table(results: list[dict]) -> str:
    """A markdown table of several drafts' results, one row each."""
    header = ["draft", "offline acceptance [bounds]", "offline greedy", "exact acceptance",
              "exact greedy", "exact on target continuations", "alpha (paper)",
              "accepted/drafted", "mean accepted length", "predicted (answers / cont.)",
              "speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(section: dict | None, key: str, fmt: str = ".4f") -> str:
        return format(section[key], fmt) if section and key in section else "-"

    noisy = []
    for r in results:
        o, e, s = r.get("offline"), r.get("exact"), r.get("speculative")
        bounds = (f"{o['expected_acceptance_lower']:.4f} - {o['expected_acceptance_upper']:.4f}"
                  if o else "-")
        timed = bool(s) and "speedup" in s
        speedup = f"{s['speedup']:.2f} ± {s['speedup_spread']:.2f}" if timed else "-"
        if timed and s.get("predicted_speedup") is not None:
            speedup += f" (predicted {s['predicted_speedup']:.2f})"
        if s and s.get("speed_within_noise"):
            noisy.append(r["draft"])
        c = r.get("exact_continuations")
        measure = "greedy_agreement" if r.get("temperature", 0) == 0 else "expected_acceptance"
        p = r.get("predicted_mean_accepted_length", {})
        predicted = " / ".join(cell(p, k, ".3f") for k in ("exact", "exact_continuations"))
        lines.append("| " + " | ".join([
            r["draft"], bounds, cell(o, "greedy_agreement"), cell(e, "expected_acceptance"),
            cell(e, "greedy_agreement"), cell(c, measure), cell(s, "alpha_paper"),
            cell(s, "draft_acceptance_rate_vllm"), cell(s, "mean_accepted_length", ".3f"),
            predicted, speedup,
        ]) + " |")
    if noisy:
        lines.append("")
        rounds = results[0]["speculative"]["speed_rounds"]
        lines.append(
            "speedup differences between drafts are within noise (median ± spread over "
            f"{rounds} rounds overlap: {', '.join(noisy)}); rank these by acceptance, not speed"
        )
    return "\n".join(lines)


def format_result(result: dict) -> str:
    """One draft's results, a few lines of text."""
    lines = [f"draft {result['draft']} on {result['task']}/{result['split']}"]
    if "offline" in result:
        o = result["offline"]
        lines.append(
            f"  offline (cache, {o['label_tokens']} tokens): expected acceptance in "
            f"[{o['expected_acceptance_lower']:.4f}, {o['expected_acceptance_upper']:.4f}], "
            f"greedy agreement {o['greedy_agreement']:.4f}"
        )
    if "exact" in result:
        e = result["exact"]
        lines.append(
            f"  exact (teacher-forced, {e['label_tokens']} tokens): expected acceptance "
            f"{e['expected_acceptance']:.4f}, greedy agreement {e['greedy_agreement']:.4f}"
        )
    for name, what in (("offline_continuations", "offline"), ("exact_continuations", "exact")):
        if name in result:
            c = result[name]
            value = (c["expected_acceptance"] if "expected_acceptance" in c else
                     (c["expected_acceptance_lower"] + c["expected_acceptance_upper"]) / 2)
            lines.append(
                f"  {what} on the target's own continuations ({c['label_tokens']} tokens): "
                f"expected acceptance {value:.4f}, greedy agreement {c['greedy_agreement']:.4f}"
            )
    p = result.get("predicted_mean_accepted_length", {})
    if len(p) > 1:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in p.items() if k != "per_token_measure")
        lines.append(f"  mean accepted length at gamma={result['gamma']} (i.i.d. prediction "
                     f"from {p['per_token_measure']}): {shown}")
    if "speculative" in result:
        s = result["speculative"]
        lines.append(
            f"  speculative (gamma={result['gamma']}, T={result['temperature']}, "
            f"{result.get('n_prompts')} prompts): alpha {s['alpha_paper']:.4f} "
            f"[accepted/(accepted+rejected), AdaSPEC paper], "
            f"{s['draft_acceptance_rate_vllm']:.4f} [accepted/drafted, vLLM], "
            f"mean accepted length {s['mean_accepted_length']:.3f}"
        )
        auto = s.get("gamma_auto")
        if auto:
            shown = ", ".join(f"{g}: {v:.2f}" for g, v in auto["predicted_speedups"].items())
            lines.append(f"  gamma auto: {auto['gamma']} (predicted speedup by gamma, from a "
                         f"pilot at gamma {auto['pilot_gamma']}: {shown})")
        c = s.get("costs")
        if c:
            verify = c["verify_cost"].get(result["gamma"], math.nan)
            lines.append(
                f"  step costs here: target {c['target_step_s'] * 1e3:.1f} ms/token, draft "
                f"c = {c['draft_cost']:.3f} of it, verifying {result['gamma'] + 1} tokens "
                f"v = {verify:.2f}; predicted speedup {s.get('predicted_speedup', math.nan):.2f}"
                " (this run's per-position acceptance)")
        if "speedup" not in s:  # --no-speed: counts only
            return "\n".join(lines)
        lines.append(
            f"  speed (median [min-max] of {s['speed_rounds']} interleaved rounds): speculative "
            f"{s['speculative_tokens_per_s']:.1f} [{s['speculative_tokens_per_s_min']:.1f}-"
            f"{s['speculative_tokens_per_s_max']:.1f}] tok/s, target-only "
            f"{s['target_tokens_per_s']:.1f} [{s['target_tokens_per_s_min']:.1f}-"
            f"{s['target_tokens_per_s_max']:.1f}] tok/s, speedup {s['speedup']:.3f} "
            f"± {s['speedup_spread']:.3f}"
        )
    return "\n".join(lines)
