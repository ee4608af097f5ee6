"""The one exception type a user can cause; CLIs print it as one line and exit non-zero."""

import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: a message that names the bad value and the fix, no traceback."""


def check_output(path, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is
    asked (or the reverse), or a location under a read-only or missing-permission folder."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a directory; pass a file name")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if existing.is_file():
        if existing != path:
            raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable")
