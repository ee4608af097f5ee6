"""`adaspec-sweep`: train a grid of drafts from one cache, evaluate each offline, table + plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaspec.cli.common import (
    ArgumentParser,
    add_config_flags,
    config_from_args,
    run,
    section_keys,
)

TRAIN_KEYS = ["batch_size", "grad_accum", "lr", "lr_schedule", "warmup_steps", "weight_decay",
              "max_grad_norm", "chunk_tokens", "normalize", "beta", "scale_epochs_by_k",
              "official_schedule",
              "selection", "threshold", "mixed_precision", "log_every"]


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaspec-sweep", description=__doc__)
    parser.add_argument("--no-progress", action="store_true")
    add_config_flags(parser, section_keys("data")
                     + section_keys("cache", only=["cache", "ref_name", "batch_tokens"])
                     + section_keys("models", only=["draft", "dtype"])
                     + section_keys("train", only=TRAIN_KEYS) + section_keys("sweep"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    from adaspec import tasks
    from adaspec.sweep import run_sweep

    tasks.check_files(cfg.data.data_files)  # before any model loads

    rows = run_sweep(cfg, progress=not args.no_progress)
    out = Path(cfg.sweep.out)
    print((out / "results.md").read_text(), end="")
    print(f"wrote {out}/report.html, results.csv, results.md, alpha_vs_k.png, loss_curves.png, "
          f"sweep.yaml ({len(rows)} variants)")
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
