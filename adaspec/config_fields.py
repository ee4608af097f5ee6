"""How a settings dataclass declares and checks its fields (used by `config`): a field's flag
(`meta`, `flag_of`), its choices (the `Literal` of its annotation: `choices_of`), its help (the
docstring under it: `field_docs`), the checks every section runs (`Checked`, `check_field`), and
the conversion of YAML and CLI values to a field's type (`coerce`)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any, ClassVar, Literal

from adaspec.errors import UserError


def meta(flag: str | None = None) -> dict:
    """Field metadata: its CLI flag (default --field-name)."""
    return {"flag": flag}


def flag_of(cls: type, name: str) -> str:
    """The CLI flag of field `name` of config class `cls`."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def literal_values(annotation) -> tuple | None:
    """The values of the Literal inside an annotation (also in `tuple[L, ...]` or `L | None`)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = literal_values(arg)
        if found is not None:
            return found
    return None


@functools.cache
def choices_of(cls: type, name: str) -> tuple | None:
    """The allowed values of a field: the Literal its annotation declares, or None."""
    return literal_values(typing.get_type_hints(cls)[name])


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


class Checked:
    """Checks every field with choices; subclasses name their `section` (a ClassVar) and add
    range checks in `check`."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        section = self.section
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = choices_of(type(self), f.name)
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if allowed is not None and value is not None:
                bad = [v for v in values if v not in allowed]
                check_field(not bad, f"{section}.{f.name}", type(self),
                       f"must be one of {', '.join(map(str, allowed))}, got {bad[0]!r}"
                       if bad else "")
        self.check()

    def check(self) -> None:
        pass

    def _range(self, name: str, ok: bool, rule: str) -> None:
        check_field(ok, f"{self.section}.{name}", type(self),
               f"{rule}, got {getattr(self, name)}")


def check_field(ok: bool, key: str, cls: type, message: str) -> None:
    if not ok:
        raise UserError(f"{key} ({flag_of(cls, key.split('.')[-1])}) {message}")


INT_LIMIT = 2**31  # rows, tokens, steps and seeds all fit; a bigger value is a typo or overflow


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if type(None) in typing.get_args(hint) and (
                value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        if str in args and len(args) > 1:  # a number, or a word (`--gamma auto`)
            try:
                return coerce(value, args[0], key)
            except UserError:
                return str(value)
        return coerce(value, args[0], key)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            items = [items]
        return tuple(coerce(v.strip() if isinstance(v, str) else v, item, key)
                     for v in items if not (isinstance(v, str) and not v.strip()))
    if origin is Literal:  # a choice: a word here, checked against the choices by the section
        return str(value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float) and isinstance(value, bool):  # YAML `limit: true` is not 1
            raise ValueError(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        converted = hint(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}") from None
    if hint is float and not math.isfinite(converted):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    if hint is int and not -INT_LIMIT < converted < INT_LIMIT:
        raise UserError(f"{key} must be below 2**31 in size, got {value!r}")
    if hint is int and key.rsplit(".", 1)[-1] in ("seed", "seeds") and not 0 <= converted:
        raise UserError(f"{key} must be >= 0 (a random seed), got {value!r}")
    return converted
