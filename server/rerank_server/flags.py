"""Dataclass fields as command-line flags (and, optionally, environment variables): one conversion for
every options dataclass (`settings.Settings`, `export.ExportOptions`).

A field declared with `option(default, help, **extra)` becomes `--field-name`; `extra` holds argparse
keywords (`choices`, `required`) and markers of its own (`secret`). Flags are parsed as text with no
default, so that "not given" stays visible and the environment or the dataclass default can fill in;
`values()` then converts each given value to the field's type, bools included ("false" is False).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# argparse keywords a field's metadata may carry; other keys (help, secret) are this module's.
_ARGPARSE_KEYWORDS = ("choices", "required")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field that is also a flag: its default, its help line, argparse keywords and markers."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(cls: type, name: str) -> type:
    """The field's type without None (`int | None` -> int), resolved from the annotations' text."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.cast(type, hint)


def add_arguments(cls: type, parser: argparse.ArgumentParser, env_prefix: str | None = None) -> None:
    """One flag per field of dataclass `cls`; a bool field gets --name and --no-name.

    The help line shows the default (unless None: the help says what happens then) and, with
    `env_prefix`, the environment variable that sets it."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        where = [f"env {env_prefix}{f.name.upper()}"] if env_prefix is not None else []
        if f.default is not None and not meta.get("required"):
            where.append(f"default {f.default}")
        help_text = meta["help"] + (f" [{'; '.join(where)}]" if where else "")
        keywords = {key: meta[key] for key in _ARGPARSE_KEYWORDS if key in meta}
        if field_type(cls, f.name) is bool:
            keywords["action"] = argparse.BooleanOptionalAction
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, help=help_text, **keywords)


def values(
    cls: type,
    args: argparse.Namespace | None,
    environ: Mapping[str, str] | None = None,
    env_prefix: str | None = None,
) -> dict[str, Any]:
    """The fields given as flags, else (with `env_prefix`) as environment variables, converted to their
    types; fields given neither are left out, so the dataclass default applies."""
    found: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None and env_prefix is not None and environ is not None:
            raw = environ.get(env_prefix + f.name.upper())
        if raw is not None:
            found[f.name] = convert(f.name, field_type(cls, f.name), raw)
    return found


def convert(name: str, kind: type, raw: Any) -> Any:
    """`raw` (a flag's or a variable's text) as `kind`; a ValueError names the field and the value."""
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kind in (int, float):
            return kind(text)
        if kind is Path:
            return Path(str(raw))
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None
    return str(raw)
