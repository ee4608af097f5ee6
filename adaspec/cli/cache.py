"""`adaspec-cache`: build, inspect and verify the offline logit cache; preview task data;
export the conversations a chat cache holds (regenerated ones included)."""

from __future__ import annotations

import argparse
import json
import sys

from adaspec.cli.common import (
    ArgumentParser,
    add_config_flags,
    config_from_args,
    run,
    section_keys,
)
from cache_tools.errors import CacheError


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adaspec-cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="run a model over a task and store its sparse outputs")
    build.add_argument(
        "--model",
        required=True,
        choices=["target", "ref"],
        help="role: target (sampled or top-K log-probs) or ref (reference losses)",
    )
    build.add_argument(
        "--model-path",
        default=None,
        help="model spec or adaspec-train run folder for the role (default: from the config / "
        "the cache)",
    )
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.add_argument("--rebuild", action="store_true",
                       help="discard the stored stage first (stale reference losses, a damaged "
                            "chunk) and build it again")
    add_config_flags(build, section_keys("data") + section_keys("cache")
                     + section_keys("models", only=["target", "dtype", "device_map"]))

    preview = sub.add_parser("preview", help="print formatted examples with token counts")
    preview.add_argument("--tokenizer", default=None, help="model spec whose tokenizer to use")
    add_config_flags(preview, section_keys("data") + ["models.target"])

    info = sub.add_parser("info", help="what a cache holds, and its size per label token")
    info.add_argument("--cache", default="./cache")
    info.add_argument("--json", action="store_true", help="print JSON")

    verify = sub.add_parser("verify", help="read every chunk and check the format's promises")
    verify.add_argument("--cache", default="./cache")

    export = sub.add_parser("export-data", help="print a split's conversations as the cache "
                            "holds them (task chat; regenerated with --generate), one JSON row a "
                            "line in the input's shape, in source order")
    export.add_argument("--cache", default="./cache")
    export.add_argument("--task", default="chat")
    export.add_argument("--split", default="train")
    return parser


def _export_data(cache: str, task: str, split: str) -> None:
    from cache_tools.store import CacheReader

    reader = CacheReader(cache, task, split, require=())
    texts = reader.texts()
    if texts is None:
        raise CacheError(f"cache {cache} {task}/{split} keeps no rows to export (only task chat "
                         "caches keep their conversations)")
    out = sys.stdout.buffer  # UTF-8 whatever the terminal's encoding
    try:
        for _, text in sorted(zip(reader.source_index.tolist(), texts, strict=True)):
            out.write(text.encode("utf-8") + b"\n")
        out.flush()
    except BrokenPipeError:  # `| head`: the reader has seen enough
        sys.stdout = None  # nothing left to flush at exit


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from cache_tools.info import cache_summary, format_summary

        records = cache_summary(args.cache)
        print(json.dumps(records, indent=2) if args.json else format_summary(args.cache, records))
        return 0
    if args.command == "export-data":
        _export_data(args.cache, args.task, args.split)
        return 0
    if args.command == "verify":
        from cache_tools.verify import verify_cache

        report = verify_cache(args.cache)
        if not report.ok:  # one line naming the array and chunk, exit 2, like every user error
            raise CacheError(f"verify failed: {report.message}")
        print("ok: " + report.message)
        return 0
    cfg = config_from_args(args)
    if args.command == "preview":
        from adaspec import models, tasks

        tasks.check_files(cfg.data.data_files)  # before the tokenizer loads
        tokenizer = models.load_tokenizer(args.tokenizer or cfg.models.target)
        print(
            tasks.preview(
                cfg.data.task,
                tokenizer,
                cfg.data.split,
                cfg.data.data_files,
                cfg.data.limit or 3,
                cfg.data.max_length,
                cfg.data.chat_template,
                cfg.data.seed,
            )
        )
        return 0
    from adaspec.build import build_stage
    from cache_tools.info import cache_summary, format_summary

    build_stage(cfg, args.model, args.model_path, progress=not args.no_progress,
                rebuild=args.rebuild)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(format_summary(cfg.cache.cache, cache_summary(cfg.cache.cache)))
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
