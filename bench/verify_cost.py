"""What verifying n tokens costs the target, with PyTorch's plain linear layers and with them
prepacked for oneDNN (`adaspec.cpu_decoding`, what `adaspec-eval` decodes with on a CPU).

One forward of n = 1..--max-tokens new tokens after a cached prompt of --prompt-tokens, rolled
back after each, as `speculative.step_costs` times them (the model as its own draft); the two
variants alternate in --rounds rounds (order rotated, one `step_costs` pass each) and each
keeps its fastest time per n. Per n: milliseconds of each variant, v(n) = time(n) /
time(1) of each (the verification cost in target steps that the speedup formula uses), and
prepacked over plain. Also the largest logit difference between the variants on the prompt.

    python -m bench.verify_cost                         # the embedded target, 2 threads
"""

from __future__ import annotations

import copy

import torch

import harness
from adaspec import cpu_decoding, models, speculative


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("verify_cost", __doc__, rounds=6, data=False)
    p.add_argument("--model", default="smollm2-135m", help="target spec (alias, dir, gguf)")
    p.add_argument("--prompt-tokens", type=int, default=120)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args(argv)
    machine = harness.start(args)
    plain, _ = models.load_model(args.model)
    packed = copy.deepcopy(plain)
    replaced = cpu_decoding.prepack_linears(packed)
    vocab = int(plain.config.get_text_config().vocab_size)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logit_gap = float((plain(prompt).logits - packed(prompt).logits).abs().max())
    variants = {"plain": plain, "prepacked": packed}
    sizes = list(range(1, args.max_tokens + 1))
    best: dict[tuple[str, int], float] = {}
    for round_index in range(args.rounds):
        for name in harness.rotated(list(variants), round_index):
            model = variants[name]
            costs = speculative.step_costs(model, model, prompt, args.max_tokens - 1, repeats=1,
                                           vocab_size=vocab)
            step = costs["target_step_s"]
            took = {1: step, **{g + 1: v * step for g, v in costs["verify_cost"].items()}}
            for n in sizes:
                best[name, n] = min(best.get((name, n), float("inf")), took[n])
    forwards = variants
    rows, table = [], []
    for n in sizes:
        row = {"tokens": n, **{f"{k}_ms": best[k, n] * 1e3 for k in forwards},
               **{f"{k}_v": best[k, n] / best[k, 1] for k in forwards},
               "prepacked_over_plain": best["prepacked", n] / best["plain", n]}
        rows.append(row)
        table.append([str(n), row["plain_ms"], row["prepacked_ms"], row["plain_v"],
                      row["prepacked_v"], row["prepacked_over_plain"]])
    print(harness.format_table(["tokens", "plain ms", "prepacked ms", "plain v(n)",
                                "prepacked v(n)", "prepacked/plain"], table))
    print(f"linears prepacked: {replaced}; largest logit difference: {logit_gap:.2e}")
    harness.write_json(args.out, {
        "benchmark": "verify_cost", "machine": machine, "settings": vars(args),
        "linears_prepacked": replaced, "max_logit_difference": logit_gap,
        "timing": f"fastest of {args.rounds} alternated rounds", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
