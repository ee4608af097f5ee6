"""`adaspec-eval`'s plan: which measures of which drafts, checked before any model loads, then
run with the target loaded once.

1. offline: teacher-forced acceptance against a cache of the evaluation split (the target is not
   loaded; `teacher_forced.offline_acceptance`).
2. exact: the same numbers with the target over the full vocabulary (`teacher_forced`).
3. speculative: real speculative decoding over the split's prompts with the three conventions
   papers and engines use, timed against target-only decoding in interleaved rounds
   (`speculative_timing`).
Statistics (speed summaries, paired differences, predictions) live in `statistics`; text in
`cli/eval_format`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adaspec import cpu_decoding, models, provenance, runs, tasks
from adaspec.config import Config, as_plain
from adaspec.errors import UserError
from adaspec.speculative_timing import (
    plan_gammas,
    predicted_at,
    speculative_acceptance,
    speculative_counts,
)
from adaspec.statistics import predicted_lengths
from adaspec.teacher_forced import (
    cache_sequences,
    exact_acceptance_many,
    offline_acceptance,
    task_sequences,
)
from cache_tools.errors import CacheError
from cache_tools.store import CacheReader


def split_prompts(cfg: Config, tokenizer, n: int) -> list[torch.Tensor]:
    """The first `n` prompts of cfg's split as (1, T) id tensors, rendered as caches render them."""
    examples = tasks.load_split(cfg.data)[:n]
    return [torch.tensor([tasks.prompt_ids(ex, tokenizer, cfg.data.chat_template,
                                           cfg.data.max_length)], dtype=torch.long)
            for ex in examples]


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
        reader = provenance.reader_of(cfg)
        provenance.check_data(cfg, reader)  # --limit, --data-files, ... as training checks them
        return reader, modes
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
        reader = CacheReader(cache, cfg.data.task, cfg.data.split,
                             local_cache=provenance.local_cache_of(cfg, cache))
    except CacheError as err:
        raise UserError(
            f"{err}; --continuations-cache holds the target's own greedy continuations: "
            f"`adaspec-cache build --model target --generate --gen-temperature 0 --cache {cache} "
            f"--task {cfg.data.task} --split {cfg.data.split} --sparse topk --topk 64 "
            "--value-encoding float16`"
        ) from None
    provenance.check_same_target(cfg, reader, f"--continuations-cache {cache}")
    if not (reader.sequence_params.get("generate") or {}).get("model"):
        raise UserError(f"--continuations-cache {cache}: its {cfg.data.task}/{cfg.data.split} "
                        "holds dataset answers, not generated continuations (build it with "
                        "--generate)")
    return reader


def _load_models(cfg: Config, specs: list[str], needs_target: bool, device):
    """(the target or None, the drafts), loaded once, on the device, in eval mode."""
    dtype = models.resolve_dtype(cfg.models.dtype, device)
    target = None
    if needs_target:
        target, _ = models.load_frozen(cfg.models.target, dtype, device, cfg.models.device_map)
    drafts = [models.load_frozen(spec, dtype, device)[0] for spec in specs]
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
    tasks.check_files(cfg.data.data_files)  # before any model loads
    asked = settings.modes is not None
    reader, modes = _open_cache(cfg, settings.modes if asked else MODES, asked, note)
    continuations = _continuations_reader(cfg, settings.continuations_cache)
    specs = [runs.resolve_run_folder(spec) for spec in draft_specs]
    tokenizers = [models.load_tokenizer(spec) for spec in specs]
    needs_target = "exact" in modes or "speculative" in modes
    target_tok = models.load_tokenizer(cfg.models.target) if needs_target else None
    for spec, tokenizer in zip(specs, tokenizers, strict=True):
        if reader is not None:
            models.check_same_tokenizer(tokenizer, reader.tokenizer_fingerprint, f"draft {spec}",
                                        f"the cache {cfg.cache.cache}")
        if continuations is not None:
            models.check_same_tokenizer(tokenizer, continuations.tokenizer_fingerprint,
                                        f"draft {spec}",
                                        f"the cache {settings.continuations_cache}")
        if target_tok is not None:
            models.shared_vocab_size(target_tok, tokenizer, f"draft {spec}")
    return _Plan(settings, modes, reader, continuations, specs, tokenizers)


def _exact_measures(cfg: Config, plan: _Plan, target, drafts: list, vocab_size: int, pad_id: int,
                    progress: bool, per_token: bool) -> tuple[list | None, list | None]:
    """Every draft's exact teacher-forced acceptance (the target's log-probs computed once for
    all of them): on the split, and on the target's continuations; None where not measured."""
    bt = cfg.cache.batch_tokens
    reader, continuations, tokenizer = plan.reader, plan.continuations, plan.tokenizers[0]
    exact = cont_exact = None
    if "exact" in plan.modes:
        # On the cache's tokens when there is one, so offline and exact compare like with like.
        seqs = cache_sequences(reader) if reader is not None else task_sequences(cfg, tokenizer)
        exact = exact_acceptance_many(drafts, target, seqs, vocab_size, pad_id, bt, progress,
                                      per_token)
    if continuations is not None and target is not None:
        cont_exact = exact_acceptance_many(drafts, target, cache_sequences(continuations),
                                           vocab_size, pad_id, bt, progress, per_token)
    return exact, cont_exact


def _teacher_forced_results(cfg: Config, plan: _Plan, drafts: list, exact: list | None,
                            cont_exact: list | None, vocab_size: int, pad_id: int,
                            progress: bool) -> list[dict]:
    """One result per draft: its settings, offline measures (each draft in turn) and the exact
    ones already measured."""
    s, modes, reader, continuations = plan.settings, plan.modes, plan.reader, plan.continuations
    bt = cfg.cache.batch_tokens
    results = []
    for d, (spec, draft) in enumerate(zip(plan.specs, drafts, strict=True)):
        result: dict = {
            "task": cfg.data.task, "split": cfg.data.split, "draft": spec,
            # --gamma auto is decided by speculative decoding; without it, the teacher-forced
            # predictions of accepted length are made at --max-gamma
            "target": cfg.models.target,
            "gamma": s.max_gamma if s.gamma == "auto" else s.gamma, "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens, "modes": list(modes),
            "eval_config": {**as_plain(dataclasses.asdict(s)), "modes": list(modes)},
        }
        if reader is not None:  # offline numbers measure agreement with the cache's target
            result["cache_target"] = reader.target_params.get("model", {})
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
    return results


def _add_speculative(cfg: Config, s, results: list[dict], target, drafts: list, tokenizer,
                     vocab_size: int, device, progress: bool) -> None:
    """Real speculative decoding of every draft over the split's prompts, against one shared
    target-only baseline; each result gets its "speculative" numbers (and gamma) in place."""
    # after every teacher-forced measure: prepacked linears compute the same function in
    # another summation order, for decoding speed only
    prepacked = s.prepack and all(cpu_decoding.available(m) for m in (target, *drafts))
    if prepacked:
        for model in (target, *drafts):
            cpu_decoding.prepack_linears(model)
    prompts = [p.to(device) for p in split_prompts(cfg, tokenizer, s.prompts)]
    decode = (drafts, target, prompts, vocab_size, tokenizer.eos_token_id)
    rest = (s.temperature, s.max_new_tokens, cfg.data.seed)
    costs, choice = plan_gammas(s, decode, rest, progress)
    gammas = [c["gamma"] for c in choice] if choice else s.gamma
    spec_results = (speculative_acceptance(*decode, gammas, *rest, s.speed_rounds, progress)
                    if s.speed else speculative_counts(*decode, gammas, *rest,
                                                       progress=progress))
    for d, (result, spec_result) in enumerate(zip(results, spec_results, strict=True)):
        result["n_prompts"] = len(prompts)
        spec_result["prepacked_linears"] = prepacked
        result["gamma"] = gammas[d] if choice else s.gamma
        if costs:
            spec_result["costs"] = costs[d]
            spec_result["predicted_speedup"] = predicted_at(spec_result, costs[d],
                                                            result["gamma"])
        if choice:
            spec_result["gamma_auto"] = choice[d]
        result["speculative"] = spec_result


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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target, drafts = _load_models(
        cfg, plan.specs, "exact" in plan.modes or "speculative" in plan.modes, device)
    if not drafts:
        return []
    # Every draft shares the target's tokenizer (checked above): one vocabulary and pad id.
    tokenizer = plan.tokenizers[0]
    vocab_size = models.real_vocab_size(tokenizer)
    pad_id = models.pad_id(tokenizer)
    exact, cont_exact = _exact_measures(cfg, plan, target, drafts, vocab_size, pad_id, progress,
                                        per_token)
    results = _teacher_forced_results(cfg, plan, drafts, exact, cont_exact, vocab_size, pad_id,
                                      progress)
    if "speculative" in plan.modes:
        _add_speculative(cfg, plan.settings, results, target, drafts, tokenizer, vocab_size,
                         device, progress)
    for result in results:
        result["predicted_mean_accepted_length"] = predicted_lengths(result)
    return results
