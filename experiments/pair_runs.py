"""Pair two experiments/forgetting.py runs made separately, method against method, per scale.

    python experiments/pair_runs.py outputs/forgetting_long outputs/forgetting_long_loramoe

forgetting.py pairs the methods of one invocation; this pairs the snapshots of two output
folders on the same facts: for every scale both ran and every pair of methods across them,
the share of the base-known facts each snapshot still gets right by multiple choice and the
exact McNemar test on the facts only one of them kept (the difference with its 95% interval,
Newcombe's paired one), with its Holm-adjusted p (every
printed comparison is one family). Both runs must have probed the same
facts with the same base answers (same config and mixture seed): it stops otherwise.
"""

from __future__ import annotations

import argparse
import sys
from itertools import product
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loramoe.data.records import read_records  # noqa: E402
from loramoe.evaluate.stats import holm_adjust, paired_binary  # noqa: E402


def snapshots(out: Path) -> dict[tuple[str, int], pd.Series]:
    """(method, scale) -> mc_correct by fact id, for every snapshot of a run."""
    rows = pd.read_csv(out / "results.csv")
    found = {}
    for _, row in rows[rows["method"] != "base"].iterrows():
        probe = read_records(out / row["method"] / "snapshots" / f"step-{int(row['steps']):05d}"
                             / "probe.jsonl")
        found[(row["method"], int(row["scale"]))] = probe.set_index("id")["mc_correct"]
    return found


def run_problem(out: Path) -> str:
    """Why `out` is not a forgetting.py output folder ('' if it is): the files read here."""
    if not out.is_dir():
        return f"{out} is not a folder" if out.exists() else f"{out} does not exist"
    needed = ["base_probe.jsonl", "results.csv"]
    if missing := [name for name in needed if not (out / name).is_file()]:
        return (f"{out} holds no {' or '.join(missing)}: not an experiments/forgetting.py "
                f"output folder, or a run that stopped before its first method was measured")
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    for name in ("first", "second"):
        if problem := run_problem(getattr(args, name)):
            parser.error(f"{name}: {problem}")
    bases = [read_records(out / "base_probe.jsonl").set_index("id")["mc_correct"]
             for out in (args.first, args.second)]
    if not bases[0].sort_index().equals(bases[1].sort_index()):
        sys.exit("the two runs probed different facts or the base answered differently: "
                 "not comparable")
    known = bases[0][bases[0]].index
    first, second = snapshots(args.first), snapshots(args.second)
    print(f"{len(known)} base-known facts; exact McNemar on the facts one snapshot kept and "
          f"the other did not")
    print("| scale | a | b | a kept | b kept | a − b [95% CI] | only a / only b | p | Holm p |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (ma, sa), (mb, sb) in product(first, second):
        if sa != sb:
            continue
        a, b = first[(ma, sa)].loc[known], second[(mb, sb)].loc[known]
        rows.append((sa, ma, mb, a, b, paired_binary(a, b)))
    adjusted = holm_adjust([test["p"] for *_, test in rows])
    for (scale, ma, mb, a, b, test), p_holm in zip(rows, adjusted, strict=True):
        change = ("–" if test["ci"] is None else  # no base-known facts
                  f"{test['diff']:+.3f} [{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}]")
        print(f"| {scale} | {ma} | {mb} | {int(a.sum())} | {int(b.sum())} | {change} | "
              f"{test['only_a']} / {test['only_b']} | {test['p']:.3g} | {p_holm:.3g} |")

if __name__ == "__main__":
    main()
