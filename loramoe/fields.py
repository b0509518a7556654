"""One validation routine for every config dataclass: types from the annotations, then rules.

Each config class calls `check_fields(self, rules, error)` first thing in `__post_init__`.
Types come from the class's own annotations, so a new field is checked without new code:
an `int` field rejects 2.5, "3" and True; a `float` field rejects "32", nan and inf; a
`list[int]` rejects [True]. No value is coerced: a config that says `alpha = "32"` is a
mistake worth hearing about, not a string to parse. Rules are (field, predicate, text)
triples checked after the types, so a predicate never sees a value of the wrong type.

Every problem of a config is reported at once, nested tables' included (one line each,
"- TrainConfig.lr: ..."), so a user fixes a file in one pass, not one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
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
    if dataclasses.is_dataclass(kind):
        return f"a table of {kind.__name__} fields"
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


def problems_error(error: type[Exception], problems: list[str]) -> Exception:
    """`error` for every problem found: one problem as its own message, several as a list.
    The exception keeps them (`problems_of`), so an outer config can report a nested
    table's problems beside its own."""
    text = problems[0] if len(problems) == 1 else (
        f"{len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems))
    err = error(text)
    err.problems = list(problems)
    return err


def fail(error: type[Exception], problems: list[str]) -> None:
    """Raise problems_error(error, problems) if there are any."""
    if problems:
        raise problems_error(error, problems)


def problems_of(err: Exception) -> list[str]:
    """The problems an error from `fail` carries (one, its message, for any other error)."""
    return list(getattr(err, "problems", [str(err)]))


def check_fields(instance: Any, rules: Iterable[Rule], error: type[Exception],
                 prefix: str | None = None, found: dict[str, list[str]] | None = None) -> None:
    """Raise `error` naming every field whose value breaks its annotated type and every
    broken rule ("Class.field: must be ..., got ..."). `found`: problems a nested table of a
    field already had (that field is not checked again). A rule is checked only on a
    well-typed field; one that fails to evaluate because another field is broken is left
    out, that field being reported already."""
    prefix = prefix or type(instance).__name__
    found = found or {}
    hints = _hints(type(instance))
    problems = [p for name in found for p in found[name]]
    broken = set(found)
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        if item.name not in found and not matches(value, hints[item.name]):
            broken.add(item.name)
            problems.append(f"{prefix}.{item.name}: must be {describe(hints[item.name])}, got "
                            f"{value!r} ({type(value).__name__})")
    for name, predicate, text in rules:
        if name in broken:
            continue
        value = getattr(instance, name)
        try:
            ok = predicate(value)
        except Exception:
            if not problems:  # no broken field to explain it: a bug in the rule itself
                raise
            continue
        if not ok:
            problems.append(f"{prefix}.{name}: must be {text}, got {value!r}")
    fail(error, problems)


def from_mapping(cls: type, data: Any, error: type[Exception], prefix: str | None = None):
    """Build config class `cls` from a table, naming unknown fields (with the known name
    each is likely a typo of) and missing ones, and a value that is no table, instead of
    raising a bare TypeError; the class then checks itself, and with unknown fields only,
    its problems are reported beside them."""
    prefix = prefix or cls.__name__
    if not isinstance(data, dict):
        raise error(f"{prefix}: must be a table of fields, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    required = sorted(f.name for f in dataclasses.fields(cls) if f.init
                      and f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING)
    missing = [name for name in required if name not in data]
    if not unknown and not missing:
        return cls(**data)
    parts = ([f"unknown field(s) {unknown}{_typo_hints(unknown, known)}"] if unknown else []) + (
        [f"missing field(s) {missing}"] if missing else [])
    problems = [f"{prefix}: {', '.join(parts)}; known: {sorted(known)}"]
    if not missing:
        try:
            cls(**{k: v for k, v in data.items() if k in known})
        except error as err:
            problems += problems_of(err)
    fail(error, problems)


def _typo_hints(unknown: list[str], known: set[str]) -> str:
    hints = [f"{close[0]!r} for {name!r}" for name in unknown
             if (close := difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75))]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""
