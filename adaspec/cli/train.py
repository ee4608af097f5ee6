"""`adaspec-train`: distil a draft (AdaSPEC), train its reference, or fine-tune the target."""

from __future__ import annotations

import argparse

from adaspec.cli.common import (
    ArgumentParser,
    add_config_flags,
    config_from_args,
    run,
    section_keys,
)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaspec-train", description=__doc__)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run folder from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_flags(parser, section_keys("data")
                     + section_keys("cache", only=["cache", "ref_name", "local_cache_dir",
                                                 "local_cache_mb"])
                     + section_keys("models") + section_keys("train"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    from accelerate import PartialState

    from adaspec import runs
    from adaspec.train import train

    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    if PartialState().is_main_process:
        print(f"saved {runs.model_dir(run_dir)} (metrics: {runs.metrics_path(run_dir)})")
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
