"""A draft's acceptance rate three ways: offline from a cache, exact with the target, and real.

1. offline: from a cache of the evaluation split (the target is not loaded): the mean over label
   tokens of sum_x min(p, q) = 1 - TVD(p, q) (the probability that a token sampled from the draft
   is accepted) lies between bounds set by the cached entries (top-K, or the distinct sampled
   tokens of a sampled cache) and the mass outside them; plus the greedy agreement rate (draft
   argmax == the target's top-1; in a sampled cache, the most probable sampled token).
2. exact: the same two numbers teacher-forced with the target loaded, over the full vocabulary.
3. speculative: real speculative decoding (`speculative.py`) over the split's prompts, with the
   three conventions papers and engines use, and the speed of speculative against target-only
   decoding measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from adaspec import acceptance, build, models, speculative, tasks
from adaspec.build import label_hidden_and_head, sparse_target_from_rows
from adaspec.config import Config
from adaspec.errors import UserError
from adaspec.stream import online_sequences
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
    return build.plan_batches(np.asarray(lengths), batch_tokens) if n else []


def label_logprobs(model, ids, masks, pad_id: int, vocab_size: int) -> torch.Tensor:
    """(N, V) float32 log-probs at the label rows of a batch of sequences."""
    n, logits_fn = label_hidden_and_head(model, ids, masks, pad_id)
    with torch.no_grad():
        logits = models.cut_logits(logits_fn(0, n), vocab_size).float().cpu()
    return torch.log_softmax(logits, dim=-1)


def known_entries(rows: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded cache rows -> (ids, log-probs with -inf for empty slots, log tail mass).

    topk rows are returned as stored. In a sampled cache the known entries are the distinct
    sampled ids (slots with count 0 are empty) and the tail is the target mass outside them.
    """
    target = sparse_target_from_rows(rows)
    logprobs = target.entry_logprobs().float()
    if target.tail_logmass is not None:
        return target.ids, logprobs, target.tail_logmass.float()
    rest = (1.0 - logprobs.double().exp().sum(-1)).clamp(min=0.0)
    return target.ids, logprobs, rest.log().float()


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
        ids, logprobs, tail = known_entries(rows)
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


def exact_acceptance(
    draft, target, seqs: _Sequences, vocab_size: int, pad_id: int, batch_tokens: int = 4096,
    progress: bool = True,
) -> dict:
    """Teacher-forced acceptance over the full vocabulary, with the target loaded."""
    total = agree = 0.0
    n_tokens = 0
    plan = _batches(len(seqs.input_ids), [len(x) for x in seqs.input_ids], batch_tokens)
    for a, b in tqdm(plan, desc="exact", disable=not progress, dynamic_ncols=True):
        ids, masks = seqs.input_ids[a:b], seqs.label_masks[a:b]
        draft_lp = label_logprobs(draft, ids, masks, pad_id, vocab_size)
        target_lp = label_logprobs(target, ids, masks, pad_id, vocab_size)
        total += float(acceptance.expected_acceptance(target_lp, draft_lp).double().sum())
        agree += float(acceptance.greedy_agreement(target_lp, draft_lp).double().sum())
        n_tokens += len(draft_lp)
    n = max(n_tokens, 1)
    return {"expected_acceptance": total / n, "greedy_agreement": agree / n,
            "label_tokens": n_tokens}


def speculative_acceptance(
    draft, target, prompts: list[torch.Tensor], vocab_size: int, eos_token_id, gamma: int,
    temperature: float, max_new_tokens: int, seed: int = 0, progress: bool = True,
) -> dict:
    """Real speculative decoding over prompts, and target-only decoding of the same prompts."""
    stats = speculative.SpecStats()
    spec_time = target_time = 0.0
    target_tokens = 0
    for i, prompt in enumerate(tqdm(prompts, desc="speculative", disable=not progress,
                                    dynamic_ncols=True)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        started = time.perf_counter()
        _, one = speculative.speculative_generate(
            target, draft, prompt, max_new_tokens, gamma, temperature, eos_token_id, vocab_size,
            generator,
        )
        spec_time += time.perf_counter() - started
        stats = stats.merge(one)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        started = time.perf_counter()
        out = speculative.target_generate(
            target, prompt, max_new_tokens, temperature, eos_token_id, vocab_size, generator
        )
        target_time += time.perf_counter() - started
        target_tokens += int(out.shape[0])
    spec_tps = stats.new_tokens / spec_time if spec_time else float("nan")
    target_tps = target_tokens / target_time if target_time else float("nan")
    return {
        "alpha_paper": stats.alpha(),
        "draft_acceptance_rate_vllm": stats.draft_acceptance_rate(),
        "mean_accepted_length": stats.mean_accepted_length(),
        "steps": stats.steps,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "new_tokens": stats.new_tokens,
        "speculative_tokens_per_s": spec_tps,
        "target_tokens_per_s": target_tps,
        "speedup": spec_tps / target_tps if target_tps else float("nan"),
    }


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


def resolve_draft(path_or_spec: str) -> str:
    """A run folder (with model/ inside) or any model spec -> a model spec."""
    from pathlib import Path

    path = Path(path_or_spec)
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    return path_or_spec


MODES = ("offline", "exact", "speculative")


def evaluate(
    cfg: Config, draft_specs: list[str], modes: tuple[str, ...] = MODES,
    gamma: int = 5, temperature: float = 0.0, max_new_tokens: int = 128, n_prompts: int = 10,
    progress: bool = True,
) -> list[dict]:
    """Every requested measure of each draft on one task split (the target loads once)."""
    unknown = set(modes) - {"offline", "exact", "speculative"}
    if unknown:
        raise UserError(f"--modes has {sorted(unknown)}; choose from offline, exact, speculative")
    if gamma < 1:
        raise UserError(f"--gamma must be >= 1, got {gamma}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = build.resolve_dtype(cfg.models.dtype, device)
    reader = None
    if "offline" in modes:
        reader = CacheReader(cfg.cache.cache, cfg.data.task, cfg.data.split)
    target = target_tok = None
    if "exact" in modes or "speculative" in modes:
        target, target_tok = models.load_model(cfg.models.target, dtype=dtype,
                                               device_map=cfg.models.device_map)
        if cfg.models.device_map is None:
            target.to(device)
        target.eval()
    results = []
    for spec in draft_specs:
        spec = resolve_draft(spec)
        draft, tokenizer = models.load_model(spec, dtype=dtype)
        draft.to(device).eval()
        vocab_size = models.real_vocab_size(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        result: dict = {
            "task": cfg.data.task, "split": cfg.data.split, "draft": spec,
            "target": cfg.models.target, "gamma": gamma, "temperature": temperature,
            "max_new_tokens": max_new_tokens,
        }
        if reader is not None:
            result["offline"] = offline_acceptance(
                draft, reader, vocab_size, pad_id, cfg.cache.batch_tokens, progress
            )
        if target is not None:
            models.shared_vocab_size(target_tok, tokenizer)
        if "exact" in modes:
            # On the cache's tokens when there is one, so offline and exact compare like with like.
            seqs = (_cache_sequences(reader) if reader is not None
                    else _task_sequences(cfg, tokenizer))
            result["exact"] = exact_acceptance(
                draft, target, seqs, vocab_size, pad_id, cfg.cache.batch_tokens, progress
            )
        if "speculative" in modes:
            prompts = _prompts(cfg, tokenizer, n_prompts)
            result["n_prompts"] = len(prompts)
            result["speculative"] = speculative_acceptance(
                draft, target, prompts, vocab_size, tokenizer.eos_token_id, gamma, temperature,
                max_new_tokens, cfg.data.seed, progress,
            )
        results.append(result)
    return results


def format_table(results: list[dict]) -> str:
    """A markdown table of several drafts' results, one row each."""
    header = ["draft", "offline acceptance [bounds]", "offline greedy", "exact acceptance",
              "exact greedy", "alpha (paper)", "accepted/drafted", "mean accepted length",
              "speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(section: dict | None, key: str, fmt: str = ".4f") -> str:
        return format(section[key], fmt) if section and key in section else "-"

    for r in results:
        o, e, s = r.get("offline"), r.get("exact"), r.get("speculative")
        bounds = (f"{o['expected_acceptance_lower']:.4f} - {o['expected_acceptance_upper']:.4f}"
                  if o else "-")
        lines.append("| " + " | ".join([
            r["draft"], bounds, cell(o, "greedy_agreement"), cell(e, "expected_acceptance"),
            cell(e, "greedy_agreement"), cell(s, "alpha_paper"),
            cell(s, "draft_acceptance_rate_vllm"), cell(s, "mean_accepted_length", ".3f"),
            cell(s, "speedup", ".3f"),
        ]) + " |")
    return "\n".join(lines)


def format_result(result: dict) -> str:
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
    if "speculative" in result:
        s = result["speculative"]
        lines.append(
            f"  speculative (gamma={result['gamma']}, T={result['temperature']}, "
            f"{result.get('n_prompts')} prompts): alpha {s['alpha_paper']:.4f} "
            f"[accepted/(accepted+rejected), AdaSPEC paper], "
            f"{s['draft_acceptance_rate_vllm']:.4f} [accepted/drafted, vLLM], "
            f"mean accepted length {s['mean_accepted_length']:.3f}"
        )
        lines.append(
            f"  speed: speculative {s['speculative_tokens_per_s']:.1f} tok/s, target-only "
            f"{s['target_tokens_per_s']:.1f} tok/s, ratio {s['speedup']:.3f}"
        )
    return "\n".join(lines)
