"""What every CLI shares: config flags made from the config classes, and one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable

from adaspec.config import SECTIONS, Config, load_config
from adaspec.config_fields import choices_of, field_docs, flag_of
from adaspec.errors import UserError
from cache_tools.errors import CacheError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other user error: one line, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def section_keys(section: str, only: list[str] | None = None,
                 without: list[str] | None = None) -> list[str]:
    """`section.field` keys of a config section (all fields, `only` these, or all `without`)."""
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if only is not None:
        names = [n for n in names if n in only]
    return [f"{section}.{n}" for n in names if n not in (without or [])]


def add_config_flags(parser: argparse.ArgumentParser, keys: list[str]) -> None:
    """A flag for each config key, made from the config class: its name (`config.flag_of`),
    type, choices and docstring (the help). Absent flags leave the YAML/default value."""
    parser.add_argument("--config", help="YAML config file (flags override it)")
    for key in keys:
        section, _, name = key.partition(".")
        cls = SECTIONS[section]
        hint = typing.get_type_hints(cls)[name]
        text = field_docs(cls).get(name, "")
        allowed = choices_of(cls, name)
        if allowed:
            text += f" {{{','.join(map(str, allowed))}}}"
        default = {f.name: f for f in dataclasses.fields(cls)}[name].default
        if default is not dataclasses.MISSING and hint is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
        text = text.replace("%", "%%")
        if hint is bool and default is True:  # on by default: the flag turns it off
            parser.add_argument("--no-" + flag_of(cls, name)[2:], dest=key,
                                action="store_const", const=False, default=None,
                                help=text + " (on by default)")
        elif hint is bool:  # a bare switch; absent means "as the config says"
            parser.add_argument(flag_of(cls, name), dest=key, action="store_const", const=True,
                                default=None, help=text)
        else:  # converted (and checked) by the config, which names the key in its errors
            flag = flag_of(cls, name)
            parser.add_argument(flag, dest=key, default=None, help=text,
                                metavar=flag.lstrip("-").replace("-", "_").upper())


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    return load_config(args.config, overrides)


def _quiet_libraries() -> None:
    """Library warnings (hub retries, load reports) would bury our one-line errors."""
    import logging

    for name in ("huggingface_hub", "transformers", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as tf_logging

        hub_logging.set_verbosity_error()
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()  # "Loading weights" bars; ours say what runs
    except ImportError:
        pass


def _no_library_bars() -> None:
    """--no-progress silences every bar, also transformers' GGUF de-quantisation bar, which is a
    plain tqdm its progress-bar switch does not reach."""
    import functools

    from tqdm.auto import tqdm

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf
    except ImportError:
        return
    gguf.tqdm = functools.partial(tqdm, disable=True)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a CLI main; user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    if "--no-progress" in (sys.argv[1:] if argv is None else argv):
        _no_library_bars()
    try:
        code = main(argv)
    except (UserError, CacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
