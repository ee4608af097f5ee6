"""Greedy decoding speed: target only, adaspec's speculative decoder, transformers' assisted
generation (the peer), with the same target, draft(s), prompts and max new tokens.

Paths, all greedy:

- **target**: `speculative.target_generate` (plain decoding with a KV cache), the baseline;
- **ours**: `speculative.speculative_generate(target, draft, ..., gamma)`, per draft;
- **assisted**: `target.generate(..., assistant_model=draft, do_sample=False)`, per draft, the
  assistant drafting a constant `gamma` tokens per step (`num_assistant_tokens = gamma`,
  schedule "constant", no confidence early stop), as tests/test_speculative.py compares them.

Every path stops at the tokenizer's EOS or at --max-new-tokens, and every path's greedy output
must equal the target's own on every prompt (a mismatch is an error naming prompt and path).
`--draft-vocab N` adds, per draft, a copy whose lm_head is reduced (`draft_vocab.reduce_head`) to
the N ids the target emits most on these prompts (plus the tokenizer's special ids): a
benchmark of the head's size only (the ids come from the measured outputs themselves, and an
untrained draft's acceptance says nothing about a trained one's).

Each of --rounds rounds sends every prompt through every path back to back, the order rotated
per round and prompt (`harness.rotated`); each path gets one untimed warm-up first. Per path:
tokens/s per round (median, min, max over rounds); its speedup over target-only as the median of
the per-round ratios (min-max); and per draft ours over assisted the same way, over all rounds
together, and by process CPU time (less sensitive to other jobs when run with --threads 1).

    python -m bench.speculative                              # embedded target, 2-layer draft
    python -m bench.speculative --drafts runs/kd,runs/kd-v --draft-vocab 4096
"""

from __future__ import annotations

import copy
import time
from collections import Counter

import torch

import harness
from adaspec import draft_vocab, models, runs, speculative, statistics, tasks

NOTE_DRAFT_VOCAB = (
    "reduced-head drafts (--draft-vocab) are a speed benchmark of the head's size only: their "
    "ids are the N most frequent in the target's own greedy outputs on these very prompts (plus "
    "the tokenizer's special ids), not a map from a training split, and an untrained draft's "
    "acceptance says nothing about a trained one's"
)


def load_prompts(task: str, split: str, data_files: str | None, tokenizer, n: int,
                 chat_template: bool, max_length: int, seed: int) -> list[torch.Tensor]:
    """(1, T) prompt ids made as `adaspec-eval` makes its speculative prompts: the split's first
    `n` examples, rendered (with the chat template or raw), the last `max_length` tokens."""
    examples = tasks.load_examples(task, split, data_files, None, seed)[:n]
    return [torch.tensor([tasks.prompt_ids(example, tokenizer, chat_template, max_length)],
                         dtype=torch.long) for example in examples]


def frequent_ids(outputs: list[list[int]], prompts: list[torch.Tensor], n: int, vocab: int,
                 always: list[int]) -> list[int]:
    """The `n` ids the target emitted most (ties: the smaller id), topped up with the prompts'
    ids and then the smallest unused ids when fewer were emitted, plus `always`; sorted."""
    counts = Counter(t for out in outputs for t in out)
    order = sorted(counts, key=lambda t: (-counts[t], t))
    seen = set(order)
    for prompt in prompts:
        for t in prompt[0].tolist():
            if t not in seen:
                order.append(t)
                seen.add(t)
    chosen = order[:n]
    fill = iter(t for t in range(vocab) if t not in seen)
    while len(chosen) < min(n, vocab):
        chosen.append(next(fill))
    return sorted(set(chosen) | {t for t in always if 0 <= t < vocab})


def head_rows(model) -> int:
    head = draft_vocab.reduced_head_of(model)
    if head is not None:
        return head.n_mapped + 1
    return int(model.get_output_embeddings().weight.shape[0])


def assistant_settings(draft, gamma: int) -> None:
    """A constant `gamma` drafted tokens per step, as our decoder drafts."""
    draft.generation_config.num_assistant_tokens = gamma
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0


def parse_args(argv: list[str] | None):
    p = harness.parser("speculative", __doc__, rounds=3, data=False)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafts", default="smollm2-135m@layers=2",
                   help="comma list of draft specs (model specs, folders or run folders)")
    p.add_argument("--task", default="arith")
    p.add_argument("--split", default="test")
    p.add_argument("--data-files", default=None, help="task rows (tasks that read files)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the task's split")
    p.add_argument("--max-length", type=int, default=512, help="prompt tokens kept (the last)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat-template", dest="chat_template", action="store_true",
                      default=True, help="prompts in the tokenizer's chat template (default)")
    chat.add_argument("--raw-prompts", dest="chat_template", action="store_false",
                      help="prompts as plain text (a tokenizer without a chat template)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per step")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="also time each draft with its head reduced to N ids (speed only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def load_drafts(drafts_arg: str, tokenizer, device: torch.device) -> list[dict]:
    """One entry per --drafts spec: label, spec, the model on `device`, its own reduced head."""
    specs = [s.strip() for s in drafts_arg.split(",") if s.strip()]
    drafts: list[dict] = []
    for spec in specs:
        path = runs.resolve_run_folder(spec)
        models.shared_vocab_size(tokenizer, models.load_tokenizer(path))
        model, _ = models.load_model(path)
        head = draft_vocab.reduced_head_of(model)  # a draft trained with --draft-vocab
        drafts.append({"label": spec, "spec": spec, "model": model.to(device).eval(),
                       "reduced_vocab": None if head is None else {
                           "n_mapped": head.n_mapped, "hash": draft_vocab.map_hash(
                               head.ids.cpu().numpy()), "from": "the draft's own map"}})
    return drafts


def add_reduced_drafts(drafts: list[dict], expected: list[list[int]],
                       prompts: list[torch.Tensor], n: int, vocab: int, tokenizer) -> None:
    """Append, per draft not already reduced, a copy with its head reduced to the `n` ids the
    target emits most (`frequent_ids`)."""
    ids = frequent_ids(expected, prompts, n, vocab, draft_vocab.special_ids(tokenizer))
    for d in list(drafts):
        if d["reduced_vocab"] is not None:
            continue  # already reduced: its own map is what it is timed with
        model = draft_vocab.reduce_head(copy.deepcopy(d["model"]), ids)
        drafts.append({"label": f"{d['label']} [head {len(ids)}]", "spec": d["spec"],
                       "model": model.eval(),
                       "reduced_vocab": {"n": n, "n_mapped": len(ids),
                                         "hash": draft_vocab.map_hash(ids),
                                         "from": "the target's outputs on these prompts"}})


class Decoders:
    """The three ways to decode a prompt greedily; `stats` gathers ours' SpecStats per draft."""

    def __init__(self, target, prompts: list[torch.Tensor], max_new_tokens: int, gamma: int,
                 eos: int | None, pad: int | None, vocab: int):
        self.target, self.prompts, self.m, self.gamma = target, prompts, max_new_tokens, gamma
        self.eos, self.pad, self.vocab = eos, pad, vocab
        self.stats: dict[str, speculative.SpecStats] = {}

    def run_target(self, i: int) -> list[int]:
        return speculative.target_generate(self.target, self.prompts[i], self.m,
                                           eos_token_id=self.eos, vocab_size=self.vocab).tolist()

    def ours(self, d: dict, i: int) -> list[int]:
        out, one = speculative.speculative_generate(self.target, d["model"], self.prompts[i],
                                                    self.m, self.gamma, eos_token_id=self.eos,
                                                    vocab_size=self.vocab)
        self.stats[d["label"]] = self.stats.get(d["label"], speculative.SpecStats()).merge(one)
        return out.tolist()

    def assisted(self, d: dict, i: int) -> list[int]:
        ids = self.prompts[i]
        out = self.target.generate(ids, attention_mask=torch.ones_like(ids),
                                   assistant_model=d["model"], do_sample=False,
                                   max_new_tokens=self.m, eos_token_id=self.eos,
                                   pad_token_id=self.pad)
        return out[0, ids.shape[1]:].tolist()

    def paths(self, drafts: list[dict]) -> dict[str, dict]:
        """Path name -> kind, draft label and its `run(i)`: target, then ours and assisted per
        draft."""
        paths: dict[str, dict] = {"target": {"kind": "target", "draft": None,
                                             "run": self.run_target}}
        for d in drafts:
            paths[f"ours {d['label']}"] = {"kind": "ours", "draft": d["label"],
                                           "run": lambda i, d=d: self.ours(d, i)}
            paths[f"assisted {d['label']}"] = {"kind": "assisted", "draft": d["label"],
                                               "run": lambda i, d=d: self.assisted(d, i)}
        return paths


def checked(paths: dict[str, dict], expected: list[list[int]], name: str,
            i: int) -> tuple[int, float, float]:
    """(tokens, wall seconds, process CPU seconds) of prompt i through a path; its output
    must be the target's."""
    speculative.synchronize()
    cpu, started = time.process_time(), time.perf_counter()
    out = paths[name]["run"](i)
    speculative.synchronize()
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    if out != expected[i]:
        pairs = enumerate(zip(out, expected[i], strict=False))
        at = next((k for k, (a, b) in pairs if a != b), min(len(out), len(expected[i])))
        raise RuntimeError(
            f"prompt {i}: path {name!r} gave {len(out)} tokens that differ from target-only "
            f"greedy decoding ({len(expected[i])} tokens) at position {at}: "
            f"{out[at:at + 5]} vs {expected[i][at:at + 5]}")
    return len(out), took, cpu


def measure_rounds(paths: dict[str, dict], expected: list[list[int]], n_prompts: int,
                   n_rounds: int, stats: dict[str, speculative.SpecStats]) -> dict:
    """One untimed warm-up per path, then `n_rounds` rounds of every prompt through every path
    (order rotated): per-path tokens, seconds and CPU seconds per round, the rounds' spans and
    the first round's SpecStats per draft."""
    names = list(paths)
    # No outer no_grad: each path is timed as a user calls it (all three disable grad).
    if n_prompts:
        for name in names:  # untimed: first calls pay for allocations and lazy init
            checked(paths, expected, name, 0)
    stats.clear()
    tokens = {n: [0] * n_rounds for n in names}
    seconds = {n: [0.0] * n_rounds for n in names}
    cpu_seconds = {n: [0.0] * n_rounds for n in names}
    rounds: list[dict] = []
    first_round: dict[str, speculative.SpecStats] = {}
    for r in range(n_rounds):
        with harness.measure() as span:
            for i in range(n_prompts):
                for name in harness.rotated(names, r + i):
                    n, took, cpu = checked(paths, expected, name, i)
                    tokens[name][r] += n
                    seconds[name][r] += took
                    cpu_seconds[name][r] += cpu
        if r == 0:
            first_round = dict(stats)
        rounds.append({"round": r, **span.as_dict()})
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds, "rounds": rounds,
            "first_round": first_round}


def path_results(paths: dict[str, dict], measured: dict) -> dict:
    """Per path: tokens/s (median, min, max) and its speedup over target-only."""
    tokens, seconds = measured["tokens"], measured["seconds"]
    results = {}
    for name in paths:
        speed = statistics.summarize_speed(tokens[name], seconds[name], tokens["target"],
                                         seconds["target"])
        results[name] = {
            "kind": paths[name]["kind"], "draft": paths[name]["draft"],
            "tokens_per_s": speed["speculative_tokens_per_s"],
            "tokens_per_s_min": speed["speculative_tokens_per_s_min"],
            "tokens_per_s_max": speed["speculative_tokens_per_s_max"],
            "speedup_over_target": speed["speedup"], "speedup_min": speed["speedup_min"],
            "speedup_max": speed["speedup_max"], "speedup_spread": speed["speedup_spread"],
            "tokens": tokens[name], "seconds": seconds[name],
            "cpu_seconds": measured["cpu_seconds"][name],
        }
    return results


def ours_vs_assisted(drafts: list[dict], measured: dict) -> dict:
    """Per draft: ours over assisted by wall time (per round and all rounds) and by CPU time,
    the head's rows and the first round's acceptance."""
    tokens, seconds, cpu_seconds = (measured["tokens"], measured["seconds"],
                                    measured["cpu_seconds"])
    comparison = {}
    for d in drafts:
        label = d["label"]
        a, b = f"ours {label}", f"assisted {label}"
        ratio = statistics.summarize_speed(tokens[a], seconds[a], tokens[b], seconds[b])
        by_cpu = statistics.summarize_speed(tokens[a], cpu_seconds[a], tokens[b], cpu_seconds[b])
        st = measured["first_round"].get(label)
        comparison[label] = {
            "ours_over_assisted": ratio["speedup"], "min": ratio["speedup_min"],
            "max": ratio["speedup_max"], "spread": ratio["speedup_spread"],
            "ours_not_slower": ratio["speedup"] >= 1.0,
            "ours_over_assisted_total": (sum(seconds[b]) / sum(seconds[a])
                                         if sum(seconds[a]) > 0 else float("nan")),
            "ours_over_assisted_cpu": by_cpu["speedup"], "cpu_min": by_cpu["speedup_min"],
            "cpu_max": by_cpu["speedup_max"],
            "head_rows": head_rows(d["model"]),
            "mean_accepted_length": st.mean_accepted_length() if st else float("nan"),
            "alpha": st.alpha() if st else float("nan"),
        }
    return comparison


def print_tables(results: dict, comparison: dict) -> None:
    print(harness.format_table(
        ["path", "tokens/s", "min", "max", "x target", "min", "max"],
        [[name, r["tokens_per_s"], r["tokens_per_s_min"], r["tokens_per_s_max"],
          r["speedup_over_target"], r["speedup_min"], r["speedup_max"]]
         for name, r in results.items()]))
    print()
    print(harness.format_table(
        ["draft", "head rows", "accepted len", "ours/assisted", "min", "max", "all rounds",
         "by CPU time", "min", "max"],
        [[label, c["head_rows"], c["mean_accepted_length"], c["ours_over_assisted"], c["min"],
          c["max"], c["ours_over_assisted_total"], c["ours_over_assisted_cpu"], c["cpu_min"],
          c["cpu_max"]] for label, c in comparison.items()]))


def write_results(args, machine: dict, prompts: list[torch.Tensor], expected: list[list[int]],
                  drafts: list[dict], results: dict, comparison: dict, rounds: list[dict]) -> None:
    harness.write_json(args.out, {
        "benchmark": "speculative",
        "machine": machine,
        "settings": vars(args),
        "note": ("greedy; every path's output equals target-only decoding on every prompt "
                 "(checked on every run); every path stops at EOS or max_new_tokens; "
                 "assisted = transformers generate(assistant_model=draft) with a constant "
                 "num_assistant_tokens = gamma and no confidence threshold"
                 + ("; " + NOTE_DRAFT_VOCAB if args.draft_vocab else "")),
        "prompts": {"n": len(prompts), "prompt_tokens": [int(x.shape[1]) for x in prompts],
                    "new_tokens": [len(e) for e in expected]},
        "drafts": [{k: v for k, v in d.items() if k != "model"} for d in drafts],
        "paths": results,
        "ours_vs_assisted": comparison,
        "rounds": rounds,
    })


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = harness.start(args)
    device = torch.device(args.device)

    target, tokenizer = models.load_model(args.target)
    target.to(device).eval()
    vocab = models.real_vocab_size(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    drafts = load_drafts(args.drafts, tokenizer, device)
    prompts = [x.to(device) for x in load_prompts(
        args.task, args.split, args.data_files, tokenizer, args.prompts, args.chat_template,
        args.max_length, args.data_seed)]
    decoders = Decoders(target, prompts, args.max_new_tokens, args.gamma, eos, pad, vocab)

    # The reference outputs (and the reduced heads' ids) before anything is timed.
    expected = [decoders.run_target(i) for i in range(len(prompts))]
    if args.draft_vocab:
        add_reduced_drafts(drafts, expected, prompts, args.draft_vocab, vocab, tokenizer)
    for d in drafts:
        assistant_settings(d["model"], args.gamma)

    paths = decoders.paths(drafts)
    measured = measure_rounds(paths, expected, len(prompts), args.rounds, decoders.stats)
    results = path_results(paths, measured)
    comparison = ours_vs_assisted(drafts, measured)
    print_tables(results, comparison)
    write_results(args, machine, prompts, expected, drafts, results, comparison,
                  measured["rounds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
