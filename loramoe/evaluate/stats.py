"""Uncertainty for every compared number: 95% intervals and paired tests on the same items.

- wilson_interval: a share k/n (retention, accuracy on binary items), Wilson score interval.
- mean_interval: one task's mean score (Wilson when the scores are 0/1, else a bootstrap).
- stratified_bootstrap: a macro average over tasks (knowledge/downstream score), resampling
  items within each task.
- mcnemar_exact: two models' correct/incorrect on the same binary items (exact binomial on
  the discordant pairs).
- newcombe_paired_interval: the 95% interval of that difference of shares (Newcombe's
  square-and-add of the two Wilson intervals, corrected for the pairs' correlation).
- paired_bootstrap: the difference of two macro scores on the same items, with its interval
  and a two-sided p-value; `significant` when the interval excludes 0.
- crossed_bootstrap: a macro score (or a paired difference) measured by several training
  seeds on the same items: seeds and items resampled together, so the interval covers
  training noise as well as the choice of items.
- holm_adjust: a family of such tests read together (every pair of branches, every claim, every
  candidate for the registry): Holm's step-down adjusted p-values, so that the chance of any
  false "significant" in the family stays at most 5 %, not 5 % per test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

Z95 = 1.959963984540054  # standard normal 97.5% quantile
ALPHA = 0.05
ROUNDS = 10_000  # bootstrap rounds: p resolves to ~0.0002, so Holm families of 40 keep power
CHUNK = 1 << 22  # resampled indices held at once (32 MiB of int64)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of successes/n; None when n = 0."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 or n successes the bound is exactly 0 or 1 (the formula leaves ~1e-17 of rounding)
    return (0.0 if successes == 0 else max(0.0, centre - half),
            1.0 if successes == n else min(1.0, centre + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: only_a items right by A alone, only_b by B alone."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def newcombe_paired_interval(both: int, only_a: int, only_b: int, neither: int,
                             z: float = Z95) -> tuple[float, float] | None:
    """95% interval of share(A right) - share(B right) on the same n items, from the paired
    2x2 table; None when n = 0. Newcombe (1998, Stat. Med. 17:2635), method 10: each share's
    Wilson interval, the distances from the estimate squared and added as for independent
    shares, less twice the correlation psi of the two shares (paired items that both models
    get right make the difference far surer than two independent samples would). psi is the
    table's phi coefficient shrunk towards 0 by n/2 when positive, as Newcombe and Fagerland,
    Lydersen & Laake (2017, ch. 8) do; 0 when a margin is empty."""
    n = both + only_a + only_b + neither
    if n == 0:
        return None
    right_a, right_b = both + only_a, both + only_b
    p_a, p_b = right_a / n, right_b / n
    lo_a, hi_a = wilson_interval(right_a, n, z)
    lo_b, hi_b = wilson_interval(right_b, n, z)
    margins = right_a * (n - right_a) * right_b * (n - right_b)
    cross = both * neither - only_a * only_b
    shrunk = cross - n / 2 if cross > n / 2 else min(cross, 0)
    psi = shrunk / math.sqrt(margins) if margins else 0.0
    diff = p_a - p_b

    def spread(below: float, above: float) -> float:  # below: A's side, above: B's
        return math.sqrt(max(0.0, below ** 2 + above ** 2 - 2 * psi * below * above))

    return diff - spread(p_a - lo_a, hi_b - p_b), diff + spread(hi_a - p_a, p_b - lo_b)


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's (1979) adjusted p-values, in the input's order: the i-th smallest of the m
    p-values times (m - i + 1), never below the one before it, at most 1. Reject where the
    adjusted p < ALPHA. None (no test) stays None and does not count in m."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def _macro(scores: np.ndarray, groups: list[np.ndarray]) -> float:
    return float(np.mean([scores[g].mean() for g in groups]))


def _resampled_means(values: np.ndarray, groups: list[np.ndarray], rounds: int,
                     seed: int) -> np.ndarray:
    """(rounds,) macro means over tasks, each task's items drawn with replacement within the
    task (stratified). Vectorised per task, in chunks of rounds that keep the index array
    near 4 M entries."""
    rng = np.random.default_rng(seed)
    means = np.empty((rounds, len(groups)))  # (R, G)
    for j, g in enumerate(groups):
        own = values[g]  # (n_g,)
        step = max(1, CHUNK // len(g))
        for at in range(0, rounds, step):
            picks = rng.integers(0, len(g), size=(min(step, rounds - at), len(g)))  # (r, n_g)
            means[at:at + len(picks), j] = own[picks].mean(axis=1)
    return means.mean(axis=1)  # (R,)


def _task_groups(tasks: pd.Series) -> list[np.ndarray]:
    codes = pd.factorize(tasks, sort=True)[0]
    return [np.flatnonzero(codes == c) for c in range(codes.max() + 1)] if len(codes) else []


def stratified_bootstrap(scores: pd.Series, tasks: pd.Series, rounds: int = ROUNDS,
                         seed: int = 0) -> dict[str, Any]:
    """Macro mean over tasks with a 95% percentile interval, items resampled per task."""
    values, groups = scores.to_numpy(float), _task_groups(tasks)
    if not groups:
        return {"value": None, "ci": None, "n": 0}
    lo, hi = np.quantile(_resampled_means(values, groups, rounds, seed),
                         [ALPHA / 2, 1 - ALPHA / 2])
    return {"value": _macro(values, groups), "ci": [float(lo), float(hi)], "n": len(values)}


def mean_interval(scores: pd.Series, rounds: int = ROUNDS, seed: int = 0
                  ) -> tuple[float, float] | None:
    """95% interval of one task's mean score; None when it has no items. A task scored 0/1
    (exact match, contains, accuracy) is a share: Wilson, which keeps its coverage on the
    dozen items a task may have, where a percentile bootstrap of a share runs narrow. A
    graded metric (F1, ROUGE-L, chrF): the percentile bootstrap of the mean."""
    values = scores.to_numpy(float)
    if not len(values):
        return None
    if np.isin(values, (0.0, 1.0)).all():
        return wilson_interval(int(values.sum()), len(values))
    lo, hi = stratified_bootstrap(scores, pd.Series(0, index=scores.index), rounds, seed)["ci"]
    return lo, hi


def paired_bootstrap(a: pd.Series, b: pd.Series, tasks: pd.Series, rounds: int = ROUNDS,
                     seed: int = 0) -> dict[str, Any]:
    """Macro score of A minus B on the same items (aligned rows), resampled per task.

    p is the two-sided bootstrap p-value: twice the share of rounds on the other side of 0,
    counted with the observed sample as one more round ((k + 1) / (rounds + 1), Davison &
    Hinkley 1997), so it is never 0: 10,000 rounds resolve p down to ~0.0002, which a Holm
    family of m tests multiplies by up to m (40 tests: ~0.008).
    """
    diff, groups = a.to_numpy(float) - b.to_numpy(float), _task_groups(tasks)
    if not groups:
        return {"diff": None, "ci": None, "p": None, "significant": False, "n": 0}
    draws = _resampled_means(diff, groups, rounds, seed)  # (R,)
    lo, hi = np.quantile(draws, [ALPHA / 2, 1 - ALPHA / 2])
    observed = _macro(diff, groups)
    beyond = min(int((draws <= 0).sum()), int((draws >= 0).sum()))
    p = min(1.0, 2 * (beyond + 1) / (rounds + 1))
    return {"diff": observed, "ci": [float(lo), float(hi)], "p": float(p),
            "significant": bool(lo > 0 or hi < 0), "n": len(diff)}


def crossed_bootstrap(values: np.ndarray, tasks: pd.Series | None = None,
                      rounds: int = ROUNDS, seed: int = 0) -> dict[str, Any]:
    """Macro mean over tasks of a (seeds, items) matrix — e.g. kept-minus-kept of two methods
    trained with the same seeds, on the same facts — with a 95% percentile interval and a
    two-sided p against 0 (as paired_bootstrap's).

    Seeds and items are crossed factors, so each round draws both with replacement (the
    "pigeonhole" bootstrap, Owen 2007): the seeds' own spread and the items' both widen the
    interval. With few seeds its seed part is coarse (two seeds: a round holds seed 1
    twice, seed 2 twice or both), so `per_seed` gives every seed's own value beside it."""
    values = np.asarray(values, float)
    if values.ndim != 2 or not values.size:
        return {"value": None, "ci": None, "p": None, "n": 0, "seeds": 0, "per_seed": []}
    n_seeds, n_items = values.shape  # (S, N)
    groups = _task_groups(tasks) if tasks is not None else [np.arange(n_items)]
    rng = np.random.default_rng(seed)
    seed_weights = np.stack([np.bincount(d, minlength=n_seeds) for d in
                             rng.integers(0, n_seeds, size=(rounds, n_seeds))]) / n_seeds  # (R, S)
    means = np.empty((rounds, len(groups)))  # (R, G)
    for j, g in enumerate(groups):
        step = max(1, CHUNK // len(g))
        for at in range(0, rounds, step):
            rows = slice(at, min(rounds, at + step))
            over_seeds = seed_weights[rows] @ values[:, g]  # (r, n_g): each round's seed mean
            picks = rng.integers(0, len(g), size=over_seeds.shape)  # (r, n_g)
            means[rows, j] = np.take_along_axis(over_seeds, picks, axis=1).mean(axis=1)
    draws = means.mean(axis=1)  # (R,)
    lo, hi = np.quantile(draws, [ALPHA / 2, 1 - ALPHA / 2])
    beyond = min(int((draws <= 0).sum()), int((draws >= 0).sum()))
    return {"value": _macro(values.mean(axis=0), groups), "ci": [float(lo), float(hi)],
            "p": min(1.0, 2 * (beyond + 1) / (rounds + 1)), "n": n_items, "seeds": n_seeds,
            "per_seed": [_macro(row, groups) for row in values]}


def paired_binary(a_correct: pd.Series, b_correct: pd.Series) -> dict[str, Any]:
    """A vs B on the same binary items: difference of shares with its 95% interval
    (Newcombe) and the exact McNemar test, which decides `significant`."""
    a, b = a_correct.to_numpy(bool), b_correct.to_numpy(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    both, n = int((a & b).sum()), len(a)
    ci = newcombe_paired_interval(both, only_a, only_b, n - both - only_a - only_b)
    p = mcnemar_exact(only_a, only_b)
    return {"diff": float(a.mean() - b.mean()) if n else None,
            "ci": list(ci) if ci else None, "only_a": only_a, "only_b": only_b, "p": p,
            "significant": p < ALPHA, "n": n}


def group_difference(values: pd.Series, tasks: pd.Series, in_a: pd.Series,
                     rounds: int = ROUNDS, seed: int = 0) -> dict[str, Any]:
    """Macro mean over the tasks of group A minus that over the other tasks (e.g. a router's
    knowledge-expert weight on knowledge tasks minus on downstream tasks), with a 95%
    percentile interval from items resampled within each task."""
    a, b = in_a.to_numpy(bool), ~in_a.to_numpy(bool)
    if not a.any() or not b.any():
        return {"value": None, "ci": None, "n": int(len(values))}
    parts = [(values[m].reset_index(drop=True), tasks[m].reset_index(drop=True)) for m in (a, b)]
    (va, ga), (vb, gb) = ((v.to_numpy(float), _task_groups(t)) for v, t in parts)
    draw_a = _resampled_means(va, ga, rounds, seed)  # (R,)
    draw_b = _resampled_means(vb, gb, rounds, seed + 1)  # (R,)
    lo, hi = np.quantile(np.subtract(draw_a, draw_b), [ALPHA / 2, 1 - ALPHA / 2])
    return {"value": _macro(va, ga) - _macro(vb, gb), "ci": [float(lo), float(hi)],
            "n": int(len(values)), "significant": bool(lo > 0 or hi < 0)}
