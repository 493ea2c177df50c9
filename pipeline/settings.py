"""One place per setting. A config dataclass field declared with `setting` carries its default, its help, its
flags and how a flag's text becomes its value; `__post_init__` holds its check. cli.py builds every option
of every command from these fields, and a sweep searches the fields marked `search`, so adding a setting is
one field (plus its check), not an option, a config call and a sweep entry kept in step by hand."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from fractions import Fraction

from .errors import KdpipeError


def setting(default=dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (), shown: str | None = None,
            parse: Callable[[str, str], object] | None = None, search: str | None = None, cli: bool = True,
            factory: Callable[[], object] | None = None, panel: str | None = None):
    """A dataclass field for a setting:
    help    its --help text; flags its option names (default `--<name>`; "--x/--no-x" for a switch);
    shown   the default as words where the value says nothing ("every split");
    parse   `(text, flag) -> value` for a setting typed on the command line as text (lists, pairs, k=v);
    search  a sweep may search it; the string is its short name in config names (T5-a0.5: "T", "a");
    cli     False: a Python-only setting; panel: the --help group it is listed under."""
    meta = {"help": help, "flags": flags, "shown": shown, "parse": parse, "search": search, "cli": cli,
            "panel": panel}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(field: dataclasses.Field) -> str:
    """A field's flags as error messages name them: `-T/--temperature`, `--alpha/--lambda`, `--lr`."""
    names = [f.split("/")[0] for f in field.metadata.get("flags", ())] or ["--" + field.name.replace("_", "-")]
    return "/".join(sorted(names, key=len))


def option_names(field: dataclasses.Field) -> tuple[str, str | None]:
    """The flag that sets a field and, for a switch, the one that clears it: ("--views", "--no-views")."""
    decls = field.metadata.get("flags", ()) or ("--" + field.name.replace("_", "-"),)
    on, _, off = next((d for d in decls if d.startswith("--")), decls[0]).partition("/")
    return on, off or None


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def value_type(cls, name: str) -> type:
    """A field's type without None: `float | None` -> float, `list[str] | None` -> list."""
    hint = _hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) or hint


# ------------------------------------------------------------------------ parsers of a flag's text


def comma_list(text: str | None, flag: str) -> list[str] | None:
    """`a,b` -> ["a", "b"]; empty -> None."""
    return [s.strip() for s in text.split(",") if s.strip()] or None if text else None


def ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KdpipeError(f"{flag}: expected integers like 0,1,2 (got {text!r})") from None


def pair(text: str, flag: str) -> tuple[float, float]:
    """Two numbers, each a decimal or a fraction ("3/4,4/3" is exactly the library's default ratio range)."""
    try:
        lo, hi = (float(Fraction(x.strip())) for x in text.split(","))
    except (ValueError, ZeroDivisionError):
        raise KdpipeError(f"{flag} takes two numbers, e.g. 0.25,1 or 3/4,4/3 (got {text!r})") from None
    return lo, hi


def overrides(text: str | None, flag: str = "--student-config") -> dict:
    """`key=value,key=value` -> dict with ints, floats and booleans parsed."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not (sep and key.strip()):
            raise KdpipeError(f"{flag}: expected key=value[,key=value...] (got {part!r})")
        out[key.strip()] = scalar(value.strip())
        if isinstance(out[key.strip()], float) and not math.isfinite(out[key.strip()]):
            raise KdpipeError(f"{flag}: {part.strip()} is not a finite number")
    return out


def scalar(value: str):
    """`true` -> True, `3` -> 3, `0.5` -> 0.5, anything else stays text."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def none_if_empty(text: str | None, flag: str) -> str | None:
    """'' -> None (e.g. --test-split '' for no test split)."""
    return text or None
