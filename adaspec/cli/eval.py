"""`adaspec-eval`: a draft's acceptance rate offline (cache), exact (teacher-forced) and real."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaspec.cli.common import (
    ArgumentParser,
    add_config_flags,
    config_from_args,
    run,
    section_keys,
)
from adaspec.errors import check_output


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaspec-eval", description=__doc__)
    parser.add_argument("--draft", required=True, nargs="+",
                        help="run folder(s) (their model/) or model spec(s)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    add_config_flags(parser, section_keys("data")
                     + section_keys("cache", only=["cache", "batch_tokens", "local_cache_dir",
                                                 "local_cache_mb"])
                     + section_keys("models", only=["target", "dtype", "device_map"])
                     + section_keys("eval"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "data.split") is None:
        setattr(args, "data.split", "test")  # evaluation reads held-out data by default
    cfg = config_from_args(args)
    if args.json:  # checked now: the results come after minutes of work
        check_output(args.json, "--json")
    from adaspec.cli.eval_format import format_comparison, format_result, format_table
    from adaspec.evaluate import evaluate
    from adaspec.statistics import compare, verdict

    results = evaluate(cfg, args.draft, progress=not args.no_progress,
                       per_token=cfg.eval.compare)
    if args.json:  # written before anything is formatted: a formatting bug loses no numbers
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = results[0] if len(results) == 1 else results
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    for result in results:
        print(format_result(result))
    if len(results) > 1:
        print(format_table(results))
    if cfg.eval.compare and len(results) > 1:
        rows = compare(results)
        print(format_comparison(rows))
        print(verdict(rows))
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
