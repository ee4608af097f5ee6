"""Real speculative decoding of drafts over prompts, measured: acceptance counts, and speed
against target-only decoding in interleaved rounds (with the step costs and, for `--gamma auto`,
the gamma they predict to be fastest).

Speeds measured once per draft drifted with the machine (the same target measured 15-26 tok/s
within one call), so target-only decoding runs once per prompt per round, shared by every draft,
each path gets an untimed warm-up, and `statistics.summarize_speed` reports medians with their
spreads.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from adaspec import speculative, speedup
from adaspec.statistics import speed_within_noise, summarize_speed


def _timed(run):
    """(run's result, wall seconds)."""
    speculative.synchronize()
    started = time.perf_counter()
    out = run()
    speculative.synchronize()
    return out, time.perf_counter() - started


def _gammas(gamma: int | list[int], n: int) -> list[int]:
    """One gamma per draft."""
    return list(gamma) if isinstance(gamma, (list, tuple)) else [gamma] * n


def speculative_counts(
    drafts: list, target, prompts: list[torch.Tensor], vocab_size: int, eos_token_id,
    gamma: int | list[int], temperature: float, max_new_tokens: int, seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Real speculative decoding of each draft over prompts, once: acceptance counts only, no
    timing (what a study of acceptance needs; `speculative_acceptance` also times it).
    `gamma` is one value for all drafts or one per draft."""
    results = []
    gammas = _gammas(gamma, len(drafts))
    bar = tqdm(total=len(drafts) * len(prompts), desc="speculative", disable=not progress,
               dynamic_ncols=True)
    for draft, gamma in zip(drafts, gammas, strict=True):
        stats = speculative.SpecStats()
        per_prompt = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device=prompt.device).manual_seed(seed * 1_000_003 + i)
            _, one = speculative.speculative_generate(target, draft, prompt, max_new_tokens,
                                                      gamma, temperature, eos_token_id,
                                                      vocab_size, gen)
            stats = stats.merge(one)
            per_prompt.append({"steps": one.steps, "accepted": one.accepted,
                               "rejected": one.rejected, "new_tokens": one.new_tokens})
            bar.update()
        results.append({**_counts(stats), "per_prompt": per_prompt})
    bar.close()
    return results


def _counts(st: speculative.SpecStats) -> dict:
    return {
        "alpha_paper": st.alpha(),
        "draft_acceptance_rate_vllm": st.draft_acceptance_rate(),
        "mean_accepted_length": st.mean_accepted_length(),
        "steps": st.steps,
        "drafted": st.drafted,
        "accepted": st.accepted,
        "rejected": st.rejected,
        "new_tokens": st.new_tokens,
        "accepted_at": list(st.accepted_at),
        "drafted_at": list(st.drafted_at),
        "at_least": speedup.at_least(st.accepted_at, st.drafted_at),
    }


def speculative_acceptance(
    drafts: list, target, prompts: list[torch.Tensor], vocab_size: int, eos_token_id,
    gamma: int | list[int], temperature: float, max_new_tokens: int, seed: int = 0,
    rounds: int = 3, progress: bool = True,
) -> list[dict]:
    """Real speculative decoding of each draft over prompts, against target-only decoding.

    Speeds measured once per draft used to drift with the machine (the same target measured
    15-26 tok/s within one call), so: target-only decoding runs once per prompt per round,
    shared by every draft; each path gets one untimed warm-up run; in each of `rounds` rounds
    every prompt runs through the target alone and through each draft back to back (order
    rotated), and `summarize_speed` reports medians with their spreads. Acceptance counts come
    from the first round's decoding, seeded per prompt as before; later rounds redo the same
    decoding (greedy is deterministic, sampling is reseeded), so only their times are used.
    """
    gammas = _gammas(gamma, len(drafts))

    def generator(i: int) -> torch.Generator:
        return torch.Generator(device=prompts[i].device).manual_seed(seed * 1_000_003 + i)

    def run(path: int, i: int) -> tuple[int, speculative.SpecStats | None]:
        """(tokens emitted, stats) of prompt i through path -1 (target only) or draft `path`."""
        if path < 0:
            out = speculative.target_generate(target, prompts[i], max_new_tokens, temperature,
                                              eos_token_id, vocab_size, generator(i))
            return int(out.shape[0]), None
        _, one = speculative.speculative_generate(
            target, drafts[path], prompts[i], max_new_tokens, gammas[path], temperature,
            eos_token_id, vocab_size, generator(i),
        )
        return one.new_tokens, one

    paths = [-1, *range(len(drafts))]
    if prompts:
        for path in paths:  # untimed: first calls pay for allocations, kernels, lazy init
            run(path, 0)
    tokens = {p: [0] * rounds for p in paths}
    seconds = {p: [0.0] * rounds for p in paths}
    stats = [speculative.SpecStats() for _ in drafts]
    per_prompt: list[list[dict]] = [[] for _ in drafts]
    bar = tqdm(total=rounds * len(prompts), desc="speculative", disable=not progress,
               dynamic_ncols=True)
    for r in range(rounds):
        for i in range(len(prompts)):
            shift = (r + i) % len(paths)
            for path in paths[shift:] + paths[:shift]:
                (n, one), took = _timed(lambda path=path, i=i: run(path, i))
                tokens[path][r] += n
                seconds[path][r] += took
                if one is not None and r == 0:
                    stats[path] = stats[path].merge(one)
                    per_prompt[path].append({"steps": one.steps, "accepted": one.accepted,
                                             "rejected": one.rejected,
                                             "new_tokens": one.new_tokens})
            bar.update()
    bar.close()
    results = []
    for d, st in enumerate(stats):
        result = {**_counts(st), "per_prompt": per_prompt[d]}
        result.update(summarize_speed(tokens[d], seconds[d], tokens[-1], seconds[-1]))
        results.append(result)
    flags = speed_within_noise([(r["speedup"], r["speedup_spread"]) for r in results])
    for result, flag in zip(results, flags, strict=True):
        result["speed_within_noise"] = flag
    return results


def plan_gammas(s, decode: tuple, rest: tuple, progress: bool
                ) -> tuple[list[dict] | None, list[dict] | None]:
    """Costs of a step per draft (timed on this machine when speed is measured or gamma is
    auto) and, with `--gamma auto`, each draft's gamma: a pilot run at --max-gamma gives
    P(A >= i) for every smaller gamma, and the predicted fastest one is chosen."""
    drafts, target, prompts = decode[0], decode[1], decode[2]
    auto = s.gamma == "auto"
    if not prompts or not (s.speed or auto):
        return None, None
    top = s.max_gamma if auto else int(s.gamma)
    costs = [speculative.step_costs(target, d, prompts[0], top, vocab_size=decode[3])
             for d in drafts]
    if not auto:
        return costs, None
    pilot = speculative_counts(*decode, s.max_gamma, *rest, progress=progress)
    choice = []
    for p, c in zip(pilot, costs, strict=True):
        predicted = speedup.predicted_speedups(p["at_least"], c["draft_cost"], c["verify_cost"])
        choice.append({"gamma": speedup.best_gamma(predicted) if predicted else 1,
                       "predicted_speedups": predicted, "pilot_at_least": p["at_least"],
                       "pilot_gamma": s.max_gamma})
    return costs, choice


def predicted_at(spec_result: dict, costs: dict, gamma: int) -> float:
    """The speedup the run's own per-position acceptance and the measured costs predict."""
    predicted = speedup.predicted_speedups(spec_result["at_least"], costs["draft_cost"],
                                           costs["verify_cost"])
    return predicted.get(gamma, math.nan)
