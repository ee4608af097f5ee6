"""`adaspec-export`: a trained draft as a folder transformers, vLLM and SGLang serve as is, or
as a GGUF file for llama.cpp (`--format gguf`)."""

from __future__ import annotations

import argparse

from adaspec.cli.common import ArgumentParser, run


def _parser() -> argparse.ArgumentParser:
    from adaspec.export import EXPORT_DTYPES
    from adaspec.export_gguf import GGUF_TYPES

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
                        help="cast the weights (default: as trained; --format hf)")
    parser.add_argument("--format", choices=["hf", "gguf"], default="hf",
                        help="hf: a save_pretrained folder (transformers, vLLM, SGLang); gguf: "
                        "FOLDER/draft.gguf for llama.cpp (-md), with the target's tokenizer")
    parser.add_argument("--gguf-type", choices=list(GGUF_TYPES), default=None,
                        help="type of the GGUF's weight matrices (default f16; norms stay f32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.format == "gguf":
        if args.dtype is not None:
            parser.error("--dtype applies to --format hf; with --format gguf use --gguf-type")
        from adaspec.export_gguf import export_gguf, format_summary

        result = export_gguf(args.run, args.out, target=args.target, best=args.best,
                             overwrite=args.overwrite, eval_json=args.eval_json,
                             gguf_type=args.gguf_type or "f16")
        print(format_summary(result))
        return 0
    if args.gguf_type is not None:
        parser.error("--gguf-type needs --format gguf")
    from adaspec.export import export_draft, format_summary

    result = export_draft(args.run, args.out, target=args.target, best=args.best,
                          overwrite=args.overwrite, eval_json=args.eval_json, dtype=args.dtype)
    print(format_summary(result))
    return 0


def entry() -> None:
    run(main)


if __name__ == "__main__":
    entry()
