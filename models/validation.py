"""Config validation that every package shares: a named error and key/type checks.

`ConfigError` is what bad input raises everywhere (train/errors.py turns it into one paragraph
and exit 2); `check_keys` names unknown keys with the closest valid spelling (HF config classes
would silently store a typo as an attribute); `check_types` names the first field of a config
dataclass whose value has the wrong type.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and says how to fix it."""


def check_keys(given: dict, allowed: set[str] | list[str], where: str) -> None:
    """Raise ConfigError naming every unknown key in `given`, with the closest valid spelling."""
    unknown = [k for k in given if k not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(f"unknown key(s) in {where}: {', '.join(hints)}. Valid keys: {sorted(allowed)}")


def check_types(obj: Any, where: str) -> None:
    """Raise ConfigError naming the first field of dataclass `obj` whose value does not have its
    annotated type (ints pass as floats; `X | None`, tuples, lists and dicts are checked one level
    deep), so `optim.lr=abc` fails at config time instead of deep inside the optimizer."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, expected = getattr(obj, f.name), hints.get(f.name, Any)
        if not _matches(value, expected):
            raise ConfigError(f"{where}.{f.name} must be {_describe(expected)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item_types = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if origin is tuple and item_types != args[:1] and len(value) != len(item_types):
            return False
        return all(_matches(v, item_types[min(i, len(item_types) - 1)]) for i, v in enumerate(value)) if item_types else True
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if expected is type(None):
        return "null"
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    if expected in names:
        return names[expected]
    if origin in (list, tuple):
        return f"a list whose items are {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(expected, "__name__", str(expected))
