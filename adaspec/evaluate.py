"""A draft's acceptance rate three ways: offline from a cache, exact with the target, and real.

1. offline: from a cache of the evaluation split (the target is not loaded): the mean over label
   tokens of sum_x min(p, q) = 1 - TVD(p, q) (the probability that a token sampled from the draft
   is accepted) lies between bounds set by the cached entries (top-K, or the distinct sampled
   tokens of a sampled cache) and the mass outside them; plus the greedy agreement rate (draft
   argmax == the target's top-1; in a sampled cache, the most probable sampled token).
2. exact: the same two numbers teacher-forced with the target loaded, over the full vocabulary.
3. speculative: real speculative decoding (`speculative.py`) over the split's prompts, with the
   three conventions papers and engines use, and the speed of speculative against target-only
   decoding: one target-only baseline for all drafts, warmed up, interleaved over rounds, and
   reported as medians with their spread (a single timing drifted too much to rank drafts).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from adaspec import acceptance, labels, models, sparse, speculative, speedup, tasks
from adaspec.config import Config, as_plain
from adaspec.errors import UserError
from adaspec.stream import online_sequences
from cache_tools.errors import CacheError
from cache_tools.store import CacheReader


@dataclass
class _Sequences:
    """Sequences to score teacher-forced: (input_ids (T,) int64, label_mask (T,) bool) pairs."""

    input_ids: list[np.ndarray]
    label_masks: list[np.ndarray]


def _cache_sequences(reader: CacheReader) -> _Sequences:
    pairs = [reader.sequence(i) for i in range(reader.n_sequences)]
    return _Sequences([p[0] for p in pairs], [p[1] for p in pairs])


def _task_sequences(cfg: Config, tokenizer) -> _Sequences:
    seqs = online_sequences(cfg, tokenizer)
    pairs = [seqs.sequence(i) for i in range(seqs.n_sequences)]
    return _Sequences([p[0] for p in pairs], [p[1] for p in pairs])


def _batches(n: int, lengths: list[int], batch_tokens: int) -> list[tuple[int, int]]:
    return labels.plan_batches(np.asarray(lengths), batch_tokens) if n else []


def label_logprobs(model, ids, masks, pad_id: int, vocab_size: int) -> torch.Tensor:
    """(N, V) float32 log-probs (on the CPU) at the label rows of a batch of sequences."""
    batch = labels.pad_batch(ids, masks, pad_id)
    return labels.LabelLogits(model, batch, vocab_size)().cpu().log_softmax(-1)


def offline_acceptance(
    draft, reader: CacheReader, vocab_size: int, pad_id: int, batch_tokens: int = 4096,
    progress: bool = True,
) -> dict:
    """Acceptance of `draft` against the cached target of `reader` (no target model)."""
    seqs = _cache_sequences(reader)
    lower_sum = upper_sum = agree = 0.0
    n_tokens = 0
    plan = _batches(reader.n_sequences, [len(x) for x in seqs.input_ids], batch_tokens)
    for a, b in tqdm(plan, desc="offline", disable=not progress, dynamic_ncols=True):
        draft_lp = label_logprobs(draft, seqs.input_ids[a:b], seqs.label_masks[a:b], pad_id,
                                   vocab_size)
        rows = reader.target_rows(int(reader.label_offsets[a]), int(reader.label_offsets[b]))
        ids, logprobs, tail = sparse.known_entries(sparse.from_rows(rows))
        lower, upper = acceptance.sparse_acceptance_bounds(ids, logprobs, tail, draft_lp)
        top1 = ids.gather(1, logprobs.argmax(-1, keepdim=True))[:, 0]  # (N,)
        lower_sum += float(lower.double().sum())
        upper_sum += float(upper.double().sum())
        agree += float((draft_lp.argmax(-1) == top1).double().sum())
        n_tokens += len(lower)
    n = max(n_tokens, 1)
    return {
        "expected_acceptance_lower": lower_sum / n,
        "expected_acceptance_upper": upper_sum / n,
        "greedy_agreement": agree / n,
        "label_tokens": n_tokens,
    }


def exact_acceptance_many(
    drafts: list, target, seqs: _Sequences, vocab_size: int, pad_id: int,
    batch_tokens: int = 4096, progress: bool = True, per_token: bool = False,
) -> list[dict]:
    """Teacher-forced acceptance over the full vocabulary, with the target loaded, for several
    drafts at once: the target's log-probs of each batch are computed once for all of them.

    `per_token` also returns each label token's values (`per_token`: expected_acceptance and
    greedy_agreement lists in sequence order, with `sequence_lengths`), for paired statistics.
    """
    totals = [[0.0, 0.0] for _ in drafts]
    tokens: list[dict[str, list]] = [{"expected_acceptance": [], "greedy_agreement": []}
                                     for _ in drafts]
    n_tokens = 0
    plan = _batches(len(seqs.input_ids), [len(x) for x in seqs.input_ids], batch_tokens)
    for a, b in tqdm(plan, desc="exact", disable=not progress, dynamic_ncols=True):
        ids, masks = seqs.input_ids[a:b], seqs.label_masks[a:b]
        target_lp = label_logprobs(target, ids, masks, pad_id, vocab_size)
        for d, draft in enumerate(drafts):
            draft_lp = label_logprobs(draft, ids, masks, pad_id, vocab_size)
            accept = acceptance.expected_acceptance(target_lp, draft_lp).double()  # (N,)
            agree = acceptance.greedy_agreement(target_lp, draft_lp).double()  # (N,)
            totals[d][0] += float(accept.sum())
            totals[d][1] += float(agree.sum())
            if per_token:
                tokens[d]["expected_acceptance"] += accept.tolist()
                tokens[d]["greedy_agreement"] += agree.tolist()
        n_tokens += len(target_lp)
    n = max(n_tokens, 1)
    out = [{"expected_acceptance": t[0] / n, "greedy_agreement": t[1] / n,
            "label_tokens": n_tokens} for t in totals]
    if per_token:
        lengths = [int(np.count_nonzero(m)) for m in seqs.label_masks]
        for result, values in zip(out, tokens, strict=True):
            result["per_token"] = {**values, "sequence_lengths": lengths}
    return out


def exact_acceptance(
    draft, target, seqs: _Sequences, vocab_size: int, pad_id: int, batch_tokens: int = 4096,
    progress: bool = True,
) -> dict:
    """Teacher-forced acceptance over the full vocabulary, with the target loaded."""
    return exact_acceptance_many([draft], target, seqs, vocab_size, pad_id, batch_tokens,
                                 progress)[0]


def _timed(run):
    """(run's result, wall seconds)."""
    speculative.synchronize()
    started = time.perf_counter()
    out = run()
    speculative.synchronize()
    return out, time.perf_counter() - started


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


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
    speedup = _median(ratios)
    low, high = (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))
    return {
        "speculative_tokens_per_s": _median(spec),
        "speculative_tokens_per_s_min": min(spec, default=float("nan")),
        "speculative_tokens_per_s_max": max(spec, default=float("nan")),
        "target_tokens_per_s": _median(target),
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


def _prompts(cfg: Config, tokenizer, n: int) -> list[torch.Tensor]:
    examples = tasks.load_examples(
        cfg.data.task, cfg.data.split, cfg.data.data_files, cfg.data.limit, cfg.data.seed
    )[:n]
    budget = cfg.data.max_length
    out = []
    for ex in examples:
        prompt_text, _ = tasks.render(ex, tokenizer, cfg.data.chat_template)
        ids = tokenizer(prompt_text).input_ids[-budget:]
        out.append(torch.tensor([ids], dtype=torch.long))
    return out


MODES = ("offline", "exact", "speculative")


def _note_on_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _open_cache(
    cfg: Config, modes: tuple[str, ...], asked: bool, note: Callable[[str], None]
) -> tuple[CacheReader | None, tuple[str, ...]]:
    """(CacheReader or None, the modes to run): offline needs the cache's split.

    When the user named the modes, a missing split is an error that says how to run without
    it; when they took the default, the modes that need no cache run and a note says so.
    """
    if "offline" not in modes:
        return None, modes
    try:
        return CacheReader(cfg.cache.cache, cfg.data.task, cfg.data.split), modes
    except CacheError as err:
        if asked:
            raise UserError(
                f"{err}; or evaluate without a cache: --modes exact,speculative"
            ) from err
        rest = tuple(m for m in modes if m != "offline")
        note(f"note: skipping offline mode ({err}); running {','.join(rest)}")
        return None, rest


def _continuations_reader(cfg: Config, cache: str | None) -> CacheReader | None:
    """The split of a cache of the target's own continuations, if one was named."""
    if cache is None:
        return None
    try:
        reader = CacheReader(cache, cfg.data.task, cfg.data.split)
    except CacheError as err:
        raise UserError(
            f"{err}; --continuations-cache holds the target's own greedy continuations: "
            f"`adaspec-cache build --model target --generate --gen-temperature 0 --cache {cache} "
            f"--task {cfg.data.task} --split {cfg.data.split} --sparse topk --topk 64 "
            "--value-encoding float16`"
        ) from None
    if not (reader.sequence_params.get("generate") or {}).get("model"):
        raise UserError(f"--continuations-cache {cache}: its {cfg.data.task}/{cfg.data.split} "
                        "holds dataset answers, not generated continuations (build it with "
                        "--generate)")
    return reader


def _check_cache_tokenizer(reader: CacheReader, spec: str, tokenizer, cache: str) -> None:
    """Offline numbers compare the draft's ids with the cache's ids: one tokenizer or nonsense.

    Exact and speculative modes compare against the target's tokenizer (shared_vocab_size);
    offline never loads the target, so this is its only check, as in training.
    """
    stored = reader.tokenizer_fingerprint
    mine = models.tokenizer_fingerprint(tokenizer)
    if mine != stored:
        raise UserError(
            f"draft {spec} uses another tokenizer (fingerprint {mine}) than the cache "
            f"{cache} (fingerprint {stored}); evaluate drafts that share the target's tokenizer"
        )


def _load_models(cfg: Config, specs: list[str], needs_target: bool, device):
    """(the target or None, the drafts), loaded once, on the device, in eval mode."""
    dtype = models.resolve_dtype(cfg.models.dtype, device)
    target = None
    if needs_target:
        target, _ = models.load_model(cfg.models.target, dtype=dtype,
                                      device_map=cfg.models.device_map)
        if cfg.models.device_map is None:
            target.to(device)
        target.eval()
    drafts = []
    for spec in specs:
        draft, _ = models.load_model(spec, dtype=dtype)
        drafts.append(draft.to(device).eval())
    return target, drafts


@dataclass
class _Plan:
    """What an evaluation measures, checked before any model loads."""

    settings: object  # EvalConfig
    modes: tuple[str, ...]
    reader: CacheReader | None
    continuations: CacheReader | None
    specs: list[str]
    tokenizers: list


def _plan(cfg: Config, draft_specs: list[str], modes, note, overrides: dict) -> _Plan:
    if "n_prompts" in overrides:
        overrides["prompts"] = overrides.pop("n_prompts")
    if modes is not None:
        overrides["modes"] = tuple(modes)
    try:
        settings = dataclasses.replace(cfg.eval, **overrides)
    except TypeError as err:
        raise ValueError(f"unknown evaluate setting: {err}") from None
    asked = settings.modes is not None
    reader, modes = _open_cache(cfg, settings.modes if asked else MODES, asked, note)
    continuations = _continuations_reader(cfg, settings.continuations_cache)
    specs = [models.resolve_run_folder(spec) for spec in draft_specs]
    tokenizers = [models.load_tokenizer(spec) for spec in specs]
    needs_target = "exact" in modes or "speculative" in modes
    target_tok = models.load_tokenizer(cfg.models.target) if needs_target else None
    for spec, tokenizer in zip(specs, tokenizers, strict=True):
        if reader is not None:
            _check_cache_tokenizer(reader, spec, tokenizer, cfg.cache.cache)
        if continuations is not None:
            _check_cache_tokenizer(continuations, spec, tokenizer, settings.continuations_cache)
        if target_tok is not None:
            models.shared_vocab_size(target_tok, tokenizer)
    return _Plan(settings, modes, reader, continuations, specs, tokenizers)


def evaluate(
    cfg: Config, draft_specs: list[str], modes: tuple[str, ...] | None = None,
    progress: bool = True, note: Callable[[str], None] = _note_on_stderr,
    per_token: bool = False, **overrides,
) -> list[dict]:
    """Every requested measure of each draft on one task split (the target loads once).

    `per_token` keeps each label token's exact values (for paired statistics across drafts).

    Settings come from `cfg.eval` (`EvalConfig`: gamma, temperature, max_new_tokens, prompts,
    speed_rounds, speed, continuations_cache), which keyword `overrides` replace (`n_prompts`
    is `prompts`); each result records the settings it was measured with. `modes=None` (or
    cfg.eval.modes None) runs every mode it can: offline only when the cache holds the split
    (`note` gets a one-line message otherwise). Every draft's tokenizer is checked before any
    number is computed; all drafts stay loaded, the target's teacher-forced log-probs are
    computed once for all of them, and speculative decoding times them against one shared
    target-only baseline (`speculative_acceptance`).
    """
    plan = _plan(cfg, draft_specs, modes, note, dict(overrides))
    s, modes, reader, continuations = plan.settings, plan.modes, plan.reader, plan.continuations
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target, drafts = _load_models(cfg, plan.specs, "exact" in modes or "speculative" in modes,
                                  device)
    if not drafts:
        return []
    # Every draft shares the target's tokenizer (checked above): one vocabulary and pad id.
    tokenizer = plan.tokenizers[0]
    vocab_size = models.real_vocab_size(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bt = cfg.cache.batch_tokens
    exact = cont_exact = None
    if "exact" in modes:
        # On the cache's tokens when there is one, so offline and exact compare like with like.
        seqs = _cache_sequences(reader) if reader is not None else _task_sequences(cfg, tokenizer)
        exact = exact_acceptance_many(drafts, target, seqs, vocab_size, pad_id, bt, progress,
                                      per_token)
    if continuations is not None and target is not None:
        cont_exact = exact_acceptance_many(drafts, target, _cache_sequences(continuations),
                                           vocab_size, pad_id, bt, progress, per_token)
    results = []
    for d, (spec, draft) in enumerate(zip(plan.specs, drafts, strict=True)):
        result: dict = {
            "task": cfg.data.task, "split": cfg.data.split, "draft": spec,
            "target": cfg.models.target, "gamma": s.gamma, "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens, "modes": list(modes),
            "eval_config": {**as_plain(dataclasses.asdict(s)), "modes": list(modes)},
        }
        if reader is not None:
            result["offline"] = offline_acceptance(draft, reader, vocab_size, pad_id, bt,
                                                   progress)
        if exact is not None:
            result["exact"] = exact[d]
        if continuations is not None:  # the target's own continuations: what decoding sees
            result["offline_continuations"] = offline_acceptance(
                draft, continuations, vocab_size, pad_id, bt, progress)
            if cont_exact is not None:
                result["exact_continuations"] = cont_exact[d]
        results.append(result)
    if "speculative" in modes:
        prompts = [p.to(device) for p in _prompts(cfg, tokenizer, s.prompts)]
        decode = (drafts, target, prompts, vocab_size, tokenizer.eos_token_id)
        rest = (s.temperature, s.max_new_tokens, cfg.data.seed)
        costs, choice = plan_gammas(s, decode, rest, progress)
        gammas = [c["gamma"] for c in choice] if choice else s.gamma
        spec_results = (speculative_acceptance(*decode, gammas, *rest, s.speed_rounds, progress)
                        if s.speed else speculative_counts(*decode, gammas, *rest,
                                                           progress=progress))
        for d, (result, spec_result) in enumerate(zip(results, spec_results, strict=True)):
            result["n_prompts"] = len(prompts)
            result["gamma"] = gammas[d] if choice else s.gamma
            if costs:
                spec_result["costs"] = costs[d]
                spec_result["predicted_speedup"] = predicted_at(spec_result, costs[d],
                                                                result["gamma"])
            if choice:
                spec_result["gamma_auto"] = choice[d]
            result["speculative"] = spec_result
    for result in results:
        result["predicted_mean_accepted_length"] = predicted_lengths(result)
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


def iid_mean_accepted_length(alpha: float, gamma: int) -> float:
    """Tokens per target call if each draft token is accepted independently with probability
    alpha (Leviathan et al. 2023, Eq. 1): (1 - alpha^(gamma + 1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def predicted_lengths(result: dict) -> dict:
    """The mean accepted length each teacher-forced measure predicts for the result's gamma:
    greedy agreement at temperature 0 (what greedy verification accepts), expected acceptance
    sum min(p, q) otherwise; beside the measured one when speculative decoding ran."""
    key = "greedy_agreement" if result["temperature"] == 0 else "expected_acceptance"
    out = {"per_token_measure": key}
    for name in ("exact", "exact_continuations"):
        if name in result:
            out[name] = iid_mean_accepted_length(result[name][key], result["gamma"])
    if "offline_continuations" in result and key == "greedy_agreement":
        out["offline_continuations"] = iid_mean_accepted_length(
            result["offline_continuations"]["greedy_agreement"], result["gamma"])
    if "speculative" in result:
        out["measured"] = result["speculative"]["mean_accepted_length"]
    return out




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
