"""Project side of bench/vllm_check.sh, after vLLM ran: the comparison (see bench/README.md).

Reads the work folder's prompts.json and adaspec.json (prepare.py) and vLLM's raw results
(engine.py), and writes one JSON (top-level "benchmark": "vllm") with, per batch size: how many
prompts' greedy outputs are identical between vLLM speculative, vLLM target-only and adaspec's
target-only decoding; vLLM's spec-decode counters and its mean accepted length
1 + accepted / drafts against adaspec-eval's 1 + accepted / steps on the same prompt ids (the
check: |difference| <= TOLERANCE); and vLLM speculative over vLLM target-only tokens/s (the
median of per-round ratios, rounds interleaved). Prints a short table.

    PYTHONPATH=. .venv/bin/python bench/vllm_check/merge.py --prompts FILE --adaspec FILE \
        --vllm FILE --out FILE       # from the repository root (it imports harness)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import harness

TOLERANCE = 0.05  # |vLLM - adaspec-eval| mean accepted length allowed (the bound)
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens",
            "num_accepted_tokens_per_pos")


def identical(a: list[list[int]], b: list[list[int]]) -> list[bool]:
    """Per prompt: the two token-id outputs are equal."""
    return [list(x) == list(y) for x, y in zip(a, b, strict=True)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two outputs differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def speed(target_tokens: list[int], target_seconds: list[float], spec_tokens: list[int],
          spec_seconds: list[float]) -> dict:
    """Tokens/s of each path (median over rounds, min, max) and the speedup: the median of
    per-round ratios (a round's two paths ran back to back, so a slow phase of the shared
    machine hits both), with its min, max and spread (half-width around the median)."""
    target = [n / s for n, s in zip(target_tokens, target_seconds, strict=True)]
    spec = [n / s for n, s in zip(spec_tokens, spec_seconds, strict=True)]
    ratios = [a / b for a, b in zip(spec, target, strict=True)]
    median = statistics.median(ratios)
    return {
        "target_tokens_per_s": statistics.median(target),
        "target_tokens_per_s_min": min(target), "target_tokens_per_s_max": max(target),
        "speculative_tokens_per_s": statistics.median(spec),
        "speculative_tokens_per_s_min": min(spec), "speculative_tokens_per_s_max": max(spec),
        "speedup": median, "speedup_min": min(ratios), "speedup_max": max(ratios),
        "speedup_spread": max(median - min(ratios), max(ratios) - median),
        "rounds": len(ratios),
    }


def batch_summary(run: dict, adaspec: dict) -> dict:
    """One batch size's comparison from engine.py's entry for it and adaspec.json."""
    vllm_target, vllm_spec = run["target_only"]["outputs"], run["speculative"]["outputs"]
    ours_target, ours_spec = adaspec["outputs"]["target_only"], adaspec["outputs"]["speculative"]
    pairs = {
        "vllm_speculative_vs_vllm_target": (vllm_spec, vllm_target),
        "vllm_target_vs_adaspec_target": (vllm_target, ours_target),
        "vllm_speculative_vs_adaspec_target": (vllm_spec, ours_target),
        "adaspec_speculative_vs_adaspec_target": (ours_spec, ours_target),
    }
    same = {name: identical(a, b) for name, (a, b) in pairs.items()}
    counts = run["speculative"]["spec_decode"]
    drafts, accepted = counts["num_drafts"], counts["num_accepted_tokens"]
    vllm_length = 1.0 + accepted / drafts if drafts else float("nan")
    ours = adaspec["eval"]["mean_accepted_length"]
    difference = vllm_length - ours
    return {
        "batch_size": run["batch_size"],
        "prompts": len(vllm_target),
        "identical": {name: sum(flags) for name, flags in same.items()},
        "per_prompt": [
            {"vllm_tokens": len(vllm_spec[i]), "adaspec_tokens": len(ours_target[i]),
             **{name: flags[i] for name, flags in same.items()},
             "first_difference_vllm_speculative_vs_adaspec_target":
                 first_difference(vllm_spec[i], ours_target[i])}
            for i in range(len(vllm_target))
        ],
        "vllm_spec_decode": {name: counts[name] for name in COUNTERS},
        "vllm_draft_acceptance_rate": (accepted / counts["num_draft_tokens"]
                                       if counts["num_draft_tokens"] else float("nan")),
        "vllm_mean_accepted_length": vllm_length,
        "adaspec_mean_accepted_length": ours,
        "difference": difference,
        "within_tolerance": abs(difference) <= TOLERANCE,
        "outputs_deterministic": run["deterministic"],
        "speed": speed(run["target_only"]["tokens"], run["target_only"]["seconds"],
                       run["speculative"]["tokens"], run["speculative"]["seconds"]),
    }


def merge(prompts: dict, adaspec: dict, vllm: dict, machine: dict | None = None,
          wall_seconds: float | None = None) -> dict:
    """The results file's content (see the module docstring)."""
    batches = {str(run["batch_size"]): batch_summary(run, adaspec) for run in vllm["runs"]}
    ok_lengths = all(b["within_tolerance"] for b in batches.values())
    ok_outputs = all(b["identical"][name] == b["prompts"] for b in batches.values()
                     for name in ("vllm_speculative_vs_vllm_target",
                                  "vllm_target_vs_adaspec_target"))
    eval_ = adaspec["eval"]
    return {
        "benchmark": "vllm",
        "settings": {
            **adaspec["settings"], "export": adaspec["export"], "target": adaspec["target"],
            "prompt_lengths": [len(p) for p in prompts["prompt_token_ids"]],
            "rounds": vllm["rounds"], "engine": vllm["engine"], "tolerance": TOLERANCE,
        },
        "machine": {**(machine or {}), "vllm_side": vllm["versions"]},
        "adaspec_eval": {
            "command": adaspec["command"],
            **{key: eval_[key] for key in ("mean_accepted_length", "steps", "drafted",
                                           "accepted", "rejected", "new_tokens",
                                           "accepted_at", "drafted_at")},
            "prompts_match": adaspec["eval_prompts_match"],
        },
        "batches": batches,
        "check": {"mean_accepted_length_within_tolerance": ok_lengths,
                  "outputs_identical": ok_outputs,
                  "adaspec_eval_decoded_these_prompts": adaspec["eval_prompts_match"],
                  "passed": ok_lengths and ok_outputs and adaspec["eval_prompts_match"]},
        "seconds": {**adaspec["seconds"], **vllm["seconds"], "wall": wall_seconds},
    }


def format_summary(result: dict) -> str:
    """The printed table: one row per batch size."""
    header = ["batch", "prompts", "spec=target vLLM", "vLLM=adaspec target", "vLLM MAL",
              "adaspec MAL", "difference", "target tok/s", "spec tok/s", "speedup"]
    rows = []
    for b in result["batches"].values():
        s, same = b["speed"], b["identical"]
        rows.append([str(b["batch_size"]), str(b["prompts"]),
                     f"{same['vllm_speculative_vs_vllm_target']}/{b['prompts']}",
                     f"{same['vllm_target_vs_adaspec_target']}/{b['prompts']}",
                     f"{b['vllm_mean_accepted_length']:.3f}",
                     f"{b['adaspec_mean_accepted_length']:.3f}", f"{b['difference']:+.3f}",
                     s["target_tokens_per_s"], s["speculative_tokens_per_s"],
                     f"{s['speedup']:.2f} ± {s['speedup_spread']:.2f}"])
    check = result["check"]
    verdict = (f"check {'passed' if check['passed'] else 'FAILED'}: outputs identical "
               f"{check['outputs_identical']}, |MAL difference| <= {TOLERANCE} "
               f"{check['mean_accepted_length_within_tolerance']} "
               "(MAL: mean accepted length, 1 + accepted / drafts)")
    return harness.format_table(header, rows) + "\n" + verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, type=Path, help="prompts.json (prepare.py)")
    p.add_argument("--adaspec", required=True, type=Path, help="adaspec.json (prepare.py)")
    p.add_argument("--vllm", required=True, type=Path, help="engine.py's JSON")
    p.add_argument("--out", default=str(harness.results_dir("bench") / "vllm.json"))
    p.add_argument("--wall-seconds", type=float, default=None, help="the whole run's time")
    args = p.parse_args(argv)
    read = [json.loads(path.read_text()) for path in (args.prompts, args.adaspec, args.vllm)]
    result = merge(*read, machine=harness.machine_info(), wall_seconds=args.wall_seconds)
    print(format_summary(result))
    harness.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
