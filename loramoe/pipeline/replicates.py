"""Training replicates: the branches of one (method, scale) trained with different seeds,
pooled so that a method comparison is judged against training noise, not only against the
choice of facts.

paired.py tests two branches on the same items: its interval says how sure we are about
*those two trained models*. Retrain with another seed and the difference moves; that spread
is what a team asking "which method keeps more?" needs covered. Here every score and every
difference is a (seeds, items) matrix, pooled with the crossed bootstrap (seeds and items
resampled together; evaluate/stats.py), two methods paired by seed (same seed: same data
order) and by item. The outcomes may come from one run with `seeds` or from several runs of
the same config and mixture (`python -m loramoe.pipeline.replicates RUN_ID ...`).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from loramoe.pipeline.config import branch_name
from loramoe.pipeline.numbers import score

COLUMNS = ["measure", "comparison", "a", "b", "seeds", "items", "diff", "diff_lo", "diff_hi",
           "per_seed", "p", "p_holm", "verdict"]
MEASURES = ("probe_retention", "downstream")


class ReplicateError(ValueError):
    """Outcomes that cannot be pooled (different facts, one seed twice); names the branches."""


def seed_of(outcome: dict[str, Any]) -> int:
    """The seed the branch trained with: its own (a run with `seeds`), else its train.seed."""
    if outcome.get("seed") is not None:
        return int(outcome["seed"])
    return int(outcome.get("trained", {}).get("train_config", {}).get("seed", 0))


def replicate_groups(outcomes: list[dict[str, Any]]) -> dict[tuple[str, int], dict[int, dict]]:
    """(method name, scale) -> {seed: outcome} over the branches that finished."""
    groups: dict[tuple[str, int], dict[int, dict]] = {}
    for outcome in outcomes:
        if outcome.get("error"):
            continue
        group = groups.setdefault((outcome["method_name"], int(outcome["scale"])), {})
        seed = seed_of(outcome)
        if seed in group:
            raise ReplicateError(f"{outcome['name']} and {group[seed]['name']} are both "
                                 f"{outcome['method_name']} at {outcome['scale']} with seed "
                                 f"{seed}: pool each training once")
        group[seed] = outcome
    return groups


def measure_matrix(outcomes: list[dict[str, Any]], measure: str
                   ) -> tuple[np.ndarray, pd.Series | None]:
    """(seeds, items) scores of one measure, in the order given, and the items' tasks
    (None: one group). probe_retention: 1 where the base-known fact is still known;
    downstream: the item's score on the downstream items."""
    if measure == "probe_retention":
        known = [tuple(o["metrics"]["probe_retention"]["known_ids"]) for o in outcomes]
        _same_items(outcomes, known, "base-known facts")
        rows = [np.isin(known[0], o["metrics"]["probe_retention"]["kept_ids"])
                for o in outcomes]
        return np.array(rows, float), None
    frames = [pd.DataFrame(o["metrics"]["item_scores"]).query("task_type == 'downstream'")
              .sort_values("id") for o in outcomes]
    _same_items(outcomes, [tuple(f["id"]) for f in frames], "downstream items")
    return (np.array([f["score"].to_numpy(float) for f in frames]),
            frames[0]["task"].reset_index(drop=True))


def _same_items(outcomes: list[dict[str, Any]], items: list[tuple], what: str) -> None:
    differing = [o["name"] for o, own in zip(outcomes, items, strict=True) if own != items[0]]
    if differing:
        raise ReplicateError(f"{differing} were not scored on the same {what} as "
                             f"{outcomes[0]['name']}: pool only runs of one config and mixture")


def _has(outcome: dict[str, Any], measure: str) -> bool:
    key = "probe_retention" if measure == "probe_retention" else "item_scores"
    return bool(outcome.get("metrics", {}).get(key))


def replicate_table(outcomes: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (method, scale): seeds, and each measure pooled over them with its crossed
    95% interval and every seed's own value."""
    from loramoe.evaluate.stats import crossed_bootstrap

    rows = []
    for (method, scale), by_seed in sorted(replicate_groups(outcomes).items(),
                                           key=lambda kv: (kv[0][1], kv[0][0])):
        seeds = sorted(by_seed)
        row: dict[str, Any] = {"method": method, "scale": scale,
                               "seeds": ",".join(map(str, seeds))}
        for measure in MEASURES:
            ordered = [by_seed[s] for s in seeds if _has(by_seed[s], measure)]
            if not ordered:
                continue
            result = crossed_bootstrap(*measure_matrix(ordered, measure))
            row.update({measure: result["value"], f"{measure}_lo": result["ci"][0],
                        f"{measure}_hi": result["ci"][1],
                        f"{measure}_per_seed": " / ".join(map(score, result["per_seed"]))})
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_difference(a: list[dict[str, Any]], b: list[dict[str, Any]], measure: str
                      ) -> dict[str, Any]:
    """A minus B on `measure`, seed by seed (a[k] and b[k] trained with the same seed) and
    item by item, pooled by the crossed bootstrap: value, ci, p, per_seed, seeds, n."""
    from loramoe.evaluate.stats import crossed_bootstrap

    both, tasks = measure_matrix([*a, *b], measure)  # (2S, N), one item order for all
    return crossed_bootstrap(both[:len(a)] - both[len(a):], tasks)  # (S, N): A - B


def _comparisons(groups: dict[tuple[str, int], dict[int, dict]]
                 ) -> list[tuple[tuple[str, int], tuple[str, int], str]]:
    """Every two methods at one scale, in the outcomes' (config) order; every method's
    consecutive scales (as paired.py)."""
    keys = sorted(groups, key=lambda k: k[1])  # stable: methods keep their order
    pairs = [(a, b, "method") for i, a in enumerate(keys) for b in keys[i + 1:] if a[1] == b[1]]
    for method in dict.fromkeys(k[0] for k in keys):
        pairs += [(a, b, "scale") for a, b in pairwise(k for k in keys if k[0] == method)]
    return pairs


def _pooled_name(key: tuple[str, int]) -> str:
    """(method name, scale) -> the branch name without a seed, e.g. "sft-4096"."""
    return branch_name({"method": key[0], "scale": key[1]})


def replicate_comparisons(outcomes: list[dict[str, Any]]) -> pd.DataFrame:
    """A minus B pooled over the seeds both trained (paired by seed and by item), per
    measure; each measure's comparisons one Holm family, as in paired.py."""
    from loramoe.evaluate.stats import ALPHA, holm_adjust

    groups = replicate_groups(outcomes)
    rows = []
    for measure in MEASURES:
        tests = []
        for a, b, kind in _comparisons(groups):
            seeds = sorted(s for s in set(groups[a]) & set(groups[b])
                           if _has(groups[a][s], measure) and _has(groups[b][s], measure))
            if not seeds:
                continue
            tests.append((a, b, kind, seeds, pooled_difference(
                [groups[a][s] for s in seeds], [groups[b][s] for s in seeds], measure)))
        adjusted = holm_adjust([t[-1]["p"] for t in tests])
        rows += [{"measure": measure, "comparison": kind, "a": _pooled_name(a),
                  "b": _pooled_name(b), "seeds": ",".join(map(str, seeds)),
                  "items": test["n"], "diff": test["value"], "diff_lo": test["ci"][0],
                  "diff_hi": test["ci"][1],
                  "per_seed": " / ".join(score(v, signed=True) for v in test["per_seed"]),
                  "p": test["p"], "p_holm": p_holm,
                  "verdict": "significant" if p_holm < ALPHA else "not significant"}
                 for (a, b, kind, seeds, test), p_holm in zip(tests, adjusted, strict=True)]
    return pd.DataFrame(rows, columns=COLUMNS)


def has_replicates(outcomes: list[dict[str, Any]]) -> bool:
    """Whether any (method, scale) was trained with more than one seed."""
    return any(len(by_seed) > 1 for by_seed in replicate_groups(outcomes).values())


def run_outcomes(run_ids: list[str], flow: str = "LoRAMoEPipeline") -> list[dict[str, Any]]:
    """Every branch outcome of the given Metaflow runs (their join step's `outcomes`)."""
    from metaflow import Run, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)  # runs of any user of this datastore
    outcomes = []
    for run_id in run_ids:
        try:
            run = Run(f"{flow}/{run_id}")
        except MetaflowNotFound:
            raise ValueError(f"run {run_id}: no {flow} run of that id in this Metaflow "
                             "datastore (run from the folder the flow ran in)") from None
        try:
            outcomes += run["join"].task["outcomes"].data
        except (KeyError, MetaflowNotFound):
            raise ValueError(f"run {run_id}: its join step did not finish (the run failed "
                             "or is still running), so it has no branch outcomes") from None
    return outcomes


def main(argv: list[str] | None = None) -> None:
    """Pool the branches of runs of one config trained with different seeds (e.g. the preset
    run, then the same with `--seeds 1`): writes replicates.csv, replicate_tests.csv,
    claims.csv (the paper claims on the pooled tests) and replicates.md to --out."""
    import argparse
    from pathlib import Path

    from loramoe.folders import folder_problem
    from loramoe.pipeline.claims import paper_claims
    from loramoe.pipeline.markdown import claims_section
    from loramoe.pipeline.report import write_replicates

    parser = argparse.ArgumentParser(prog="python -m loramoe.pipeline.replicates",
                                     description=main.__doc__)
    parser.add_argument("run_ids", nargs="+", help="Metaflow run ids of LoRAMoEPipeline")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--flow", default="LoRAMoEPipeline")
    args = parser.parse_args(argv)
    if problem := folder_problem(args.out):  # before the runs' artifacts are read
        parser.error(f"--out: {problem}")
    try:
        outcomes = run_outcomes(args.run_ids, args.flow)
    except ValueError as err:
        parser.error(str(err))
    if not has_replicates(outcomes):
        parser.error(f"runs {args.run_ids}: no (method, scale) trained with two seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    section = write_replicates(outcomes, args.out)  # replicates.csv, replicate_tests.csv
    claims = paper_claims(outcomes)  # its paired tests pool the seeds the roles share
    claims.to_csv(args.out / "claims.csv", index=False)
    report = args.out / "replicates.md"
    report.write_text(f"# Replicates of runs {', '.join(args.run_ids)}\n\n"
                      + section + "\n\n"
                      + claims_section(claims) + "\n")
    print(report.read_text())


if __name__ == "__main__":
    main()
