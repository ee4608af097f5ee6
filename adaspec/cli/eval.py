"""`adaspec-eval`: a draft's acceptance rate offline (cache), exact (teacher-forced) and real."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaspec.cli.common import ArgumentParser, add_config_flags, config_from_args, run

DATA_FLAGS = ["--task", "--split", "--data-files", "--limit", "--max-length", "--chat-template",
              "--data-seed"]


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaspec-eval", description=__doc__)
    parser.add_argument("--draft", required=True, nargs="+",
                        help="run folder(s) (their model/) or model spec(s)")
    parser.add_argument("--modes", default=None,
                        help="comma list of offline, exact, speculative (default: all three, "
                             "offline only when the cache holds the split)")
    parser.add_argument("--gamma", type=int, default=5, help="draft tokens per step")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=10, help="prompts for speculative decoding")
    parser.add_argument("--speed-rounds", type=int, default=3,
                        help="interleaved timing rounds of speculative and target-only decoding "
                             "(>= 3; speeds are medians over rounds)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    add_config_flags(parser, DATA_FLAGS + ["--cache", "--target", "--dtype", "--device-map",
                                           "--batch-tokens"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "data.split") is None:
        setattr(args, "data.split", "test")  # evaluation reads held-out data by default
    cfg = config_from_args(args)
    from adaspec.evaluate import evaluate, format_result, format_table

    modes = (None if args.modes is None  # None: every mode the cache allows
             else tuple(m.strip() for m in args.modes.split(",") if m.strip()))
    results = evaluate(cfg, args.draft, modes, args.gamma, args.temperature, args.max_new_tokens,
                       args.prompts, progress=not args.no_progress,
                       speed_rounds=args.speed_rounds)
    for result in results:
        print(format_result(result))
    if len(results) > 1:
        print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = results[0] if len(results) == 1 else results
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
