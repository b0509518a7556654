"""One validation routine for every config dataclass: types from the annotations, then rules.

Each config class calls `check_fields(self, rules, error)` first thing in `__post_init__`.
Types come from the class's own annotations, so a new field is checked without new code:
an `int` field rejects 2.5, "3" and True; a `float` field rejects "32", nan and inf; a
`list[int]` rejects [True]. No value is coerced: a config that says `alpha = "32"` is a
mistake worth hearing about, not a string to parse. Rules are (field, predicate, text)
triples checked after the types, so a predicate never sees a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any, Literal, Union

Rule = tuple[str, Callable[[Any], bool], str]


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(kind: Any) -> str:
    """A type annotation in words, for error messages."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return "any value"
    if kind is type(None):
        return "unset"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list (each item {describe(args[0])})" if args else "a list"
    if origin is dict:
        return f"a table (each value {describe(args[1])})" if args else "a table"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(kind, f"a {getattr(kind, '__name__', kind)}")


def matches(value: Any, kind: Any) -> bool:
    """Whether value has the annotated type (recursively for lists and dicts)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True  # annotations this routine does not understand are left to the rules


def check_fields(instance: Any, rules: Iterable[Rule], error: type[Exception],
                 prefix: str | None = None) -> None:
    """Raise `error("Class.field: must be ..., got ...")` for the first field whose value
    breaks its annotated type, then for the first broken rule."""
    prefix = prefix or type(instance).__name__
    hints = _hints(type(instance))
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        if not matches(value, hints[item.name]):
            raise error(f"{prefix}.{item.name}: must be {describe(hints[item.name])}, got "
                        f"{value!r} ({type(value).__name__})")
    for name, predicate, text in rules:
        value = getattr(instance, name)
        if not predicate(value):
            raise error(f"{prefix}.{name}: must be {text}, got {value!r}")


def from_mapping(cls: type, data: Any, error: type[Exception], prefix: str | None = None):
    """Build config class `cls` from a table, naming unknown and missing fields (and a value
    that is no table) instead of raising a bare TypeError; the class then checks itself."""
    prefix = prefix or cls.__name__
    if not isinstance(data, dict):
        raise error(f"{prefix}: must be a table of fields, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    required = sorted(f.name for f in dataclasses.fields(cls) if f.init
                      and f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING)
    missing = [name for name in required if name not in data]
    if unknown or missing:
        parts = ([f"unknown field(s) {unknown}"] if unknown else []) + (
            [f"missing field(s) {missing}"] if missing else [])
        raise error(f"{prefix}: {', '.join(parts)}; known: {sorted(known)}")
    return cls(**data)
