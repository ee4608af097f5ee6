"""`adaspec-sweep`: train a grid of drafts from one cache, evaluate each offline, table + plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaspec.cli.common import ArgumentParser, add_config_flags, config_from_args, run
from adaspec.errors import UserError

DATA_FLAGS = ["--task", "--split", "--data-files", "--limit", "--max-length", "--chat-template",
              "--data-seed"]
TRAIN_FLAGS = ["--batch-size", "--lr", "--lr-schedule", "--warmup-steps", "--weight-decay",
               "--max-grad-norm", "--chunk-tokens", "--normalize", "--beta",
               "--scale-epochs-by-k"]


def _list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes a comma list of {kind.__name__}, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaspec-sweep", description=__doc__)
    parser.add_argument("--k", default="0.2,0.4,0.6,0.8,1.0", help="comma list of k")
    parser.add_argument("--epochs", default="1", help="comma list of epoch counts")
    parser.add_argument("--loss", default="fkl", help="comma list of divergences")
    parser.add_argument("--seeds", default="0", help="comma list of seeds")
    parser.add_argument("--out", default="sweep", help="sweep folder (one run folder a variant)")
    parser.add_argument("--eval-split", default="test",
                        help="split whose target cache the drafts are evaluated on")
    parser.add_argument("--single-pass", action="store_true",
                        help="train variants sharing seed and loss in one pass over the data")
    parser.add_argument("--no-progress", action="store_true")
    add_config_flags(parser, DATA_FLAGS + ["--cache", "--ref-name", "--draft"] + TRAIN_FLAGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    from adaspec.config import build_config
    from adaspec.sweep import grid, run_sweep

    ks = _list(args.k, float, "--k")
    epochs = _list(args.epochs, float, "--epochs")
    divergences = _list(args.loss, str, "--loss")
    seeds = _list(args.seeds, int, "--seeds")
    for k, e, d in ((k, e, d) for k in ks for e in epochs for d in divergences):
        build_config({"train": {"k": k, "epochs": e, "loss": d}})  # range checks, one line
    rows = run_sweep(cfg, grid(ks, epochs, divergences, seeds), Path(args.out), args.eval_split,
                     args.single_pass, progress=not args.no_progress)
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"wrote {args.out}/results.csv, results.md, alpha_vs_k.png, loss_curves.png "
          f"({len(rows)} variants)")
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
