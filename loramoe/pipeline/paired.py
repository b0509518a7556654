"""Paired comparisons across branches: every two methods at one scale and every method's
consecutive scales, each on the same items.

Retention (generation, and the probe's multiple choice) is compared on the base-known facts
by exact McNemar; the downstream macro score on the same downstream items by a paired
bootstrap stratified by task. Each measure's comparisons are one family: the verdict reads
the Holm-adjusted p (`p_holm`), so a run with many branches does not find "a significant
difference" by testing every pair.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pandas as pd

COLUMNS = ["measure", "comparison", "a", "b", "items", "diff", "diff_lo", "diff_hi", "only_a",
           "only_b", "p", "p_holm", "verdict"]
RETENTION_MEASURES = ("retention", "probe_retention")


def paired_kept(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, Any]:
    """Retention `key` of A minus B on A's base-known facts (the base's, shared by every
    branch): difference of shares and the exact McNemar test."""
    from loramoe.evaluate.stats import paired_binary

    known = a["metrics"][key].get("known_ids", [])
    kept_a = set(a["metrics"][key].get("kept_ids", []))
    kept_b = set(b["metrics"][key].get("kept_ids", []))
    return paired_binary(pd.Series([i in kept_a for i in known], dtype=bool),
                         pd.Series([i in kept_b for i in known], dtype=bool))


def downstream_pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Downstream macro score of A minus B on the same items (paired bootstrap per task)."""
    from loramoe.evaluate.stats import paired_bootstrap

    sa, sb = (pd.DataFrame(x["metrics"]["item_scores"]) for x in (a, b))
    both = sa.merge(sb[["id", "score"]], on="id", suffixes=("_a", "_b"))
    both = both[both["task_type"] == "downstream"].reset_index(drop=True)
    return paired_bootstrap(both["score_a"], both["score_b"], both["task"])


def replicates_at_shared_seeds(a: dict[str, Any], b: dict[str, Any],
                               branches: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """A's and B's seed replicates (same method name and scale) at the seeds both trained."""
    from loramoe.pipeline.replicates import replicate_groups

    groups = replicate_groups(branches)
    ra, rb = (groups[(x["method_name"], int(x["scale"]))] for x in (a, b))
    seeds = sorted(set(ra) & set(rb))
    return [ra[s] for s in seeds], [rb[s] for s in seeds]


def difference(a: dict[str, Any], b: dict[str, Any], branches: list[dict[str, Any]],
               measure: str) -> dict[str, Any]:
    """A minus B on `measure` ("probe_retention" or "downstream"): pooled over the seeds
    both trained if there are ≥ 2 (crossed bootstrap; `per_seed` says so), else this one pair
    (exact McNemar / paired bootstrap)."""
    from loramoe.evaluate.stats import ALPHA
    from loramoe.pipeline.replicates import pooled_difference

    ra, rb = replicates_at_shared_seeds(a, b, branches)
    if len(ra) < 2:
        return (paired_kept(a, b, measure) if measure == "probe_retention"
                else downstream_pair(a, b))
    pooled = pooled_difference(ra, rb, measure)
    return {**pooled, "diff": pooled["value"], "significant": pooled["p"] < ALPHA}


def comparison_pairs(ok: list[dict[str, Any]]) -> list[tuple[dict, dict, str]]:
    """(a, b, "method") for every two branches at one scale, (smaller, larger, "scale") for
    every method's consecutive scales; a run with seeds pairs within each seed (across seeds
    see replicates.py)."""
    pairs = [(a, b, "method") for i, a in enumerate(ok) for b in ok[i + 1:]
             if a["scale"] == b["scale"] and a.get("seed") == b.get("seed")]
    for method, seed in sorted({(b["method_name"], b.get("seed") or 0) for b in ok}):
        series = sorted((b for b in ok if b["method_name"] == method
                         and (b.get("seed") or 0) == seed), key=lambda b: b["scale"])
        pairs += [(small, large, "scale") for small, large in pairwise(series)]
    return pairs


def family_table(measure: str, tests: list[tuple[dict, dict, str, dict]]) -> pd.DataFrame:
    """One row per test (a, b, kind, result), verdicts from the family's Holm-adjusted p."""
    from loramoe.evaluate.stats import ALPHA, holm_adjust

    tests = [t for t in tests if t[3]["n"]]  # nothing to compare on: no test
    adjusted = holm_adjust([test["p"] for *_, test in tests])
    rows = [{"measure": measure, "comparison": kind, "a": a["name"], "b": b["name"],
             "items": test["n"], "diff": test["diff"],
             "diff_lo": (test.get("ci") or [None, None])[0],
             "diff_hi": (test.get("ci") or [None, None])[1],
             "only_a": test.get("only_a"), "only_b": test.get("only_b"), "p": test["p"],
             "p_holm": p_holm, "verdict": "significant" if p_holm < ALPHA else "not significant"}
            for (a, b, kind, test), p_holm in zip(tests, adjusted, strict=True)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _ok(branches: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [b for b in branches if not b.get("error") and b["metrics"].get(key)]


def paired_on(branches: list[dict[str, Any]], key: str) -> pd.DataFrame:
    """The family of retention `key` (e.g. "probe_retention"): every pair, exact McNemar."""
    return family_table(key, [(a, b, kind, paired_kept(a, b, key))
                              for a, b, kind in comparison_pairs(_ok(branches, key))])


def paired_comparisons(branches: list[dict[str, Any]]) -> pd.DataFrame:
    """Every measure's family of paired comparisons, one table (paired.csv)."""
    parts = [paired_on(branches, key) for key in RETENTION_MEASURES]
    downstream = comparison_pairs(_ok(branches, "item_scores"))
    parts.append(family_table("downstream", [(a, b, kind, downstream_pair(a, b))
                                             for a, b, kind in downstream]))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
