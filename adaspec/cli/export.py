"""`adaspec-export`: a trained draft as a folder transformers, vLLM and SGLang serve as is."""

from __future__ import annotations

import argparse

from adaspec.cli.common import ArgumentParser, run


def _parser() -> argparse.ArgumentParser:
    from adaspec.export import EXPORT_DTYPES

    parser = ArgumentParser(prog="adaspec-export", description=__doc__)
    parser.add_argument("run", metavar="RUN",
                        help="run folder (its model/, or best/ with --best) or model spec")
    parser.add_argument("--target", default=None,
                        help="the target the draft serves (default: the run's models.target)")
    parser.add_argument("--out", required=True, help="folder to write (must be empty or new)")
    parser.add_argument("--best", action="store_true",
                        help="export the run's best-epoch model (best/, from --keep-best)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--eval-json", default=None,
                        help="adaspec-eval --json results of this draft, quoted in the model card")
    parser.add_argument("--dtype", choices=list(EXPORT_DTYPES), default=None,
                        help="cast the weights (default: as trained)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from adaspec.export import export_draft, format_summary

    result = export_draft(args.run, args.out, target=args.target, best=args.best,
                          overwrite=args.overwrite, eval_json=args.eval_json, dtype=args.dtype)
    print(format_summary(result))
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
