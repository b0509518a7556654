"""How the report, the paper-claims verdicts, the plots and the registry's descriptions write
a number, so that one figure reads the same everywhere: scores and differences to 3
decimals (differences signed), p-values to 3 significant digits (a bootstrap p of 0.0002 is
never "0.000"), and "–" where there is no value."""

from __future__ import annotations

import pandas as pd

MISSING = "–"


def is_missing(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def score(value, signed: bool = False) -> str:
    """0.839, or +0.012 for a difference."""
    if is_missing(value):
        return MISSING
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def p_value(value) -> str:
    """0.049, 0.0002, 6.1e-05."""
    return MISSING if is_missing(value) else f"{value:.3g}"


def bounds(lo, hi, signed: bool = False) -> str:
    """[0.823, 0.854], or "–" without an interval."""
    if is_missing(lo) or is_missing(hi):
        return MISSING
    return f"[{score(lo, signed)}, {score(hi, signed)}]"


def with_interval(value, lo, hi, signed: bool = False) -> str:
    """0.839 [0.823, 0.854]; the value alone where it has no interval."""
    text = score(value, signed)
    if text == MISSING or is_missing(lo) or is_missing(hi):
        return text
    return f"{text} {bounds(lo, hi, signed)}"
