"""Re-read a committed report's paired comparisons with Holm's adjustment.

    python experiments/holm_reread.py docs/results.md [more reports...]

Reports written before the compare step adjusted its p-values (loramoe/pipeline/report.py)
label each paired comparison by its raw p < 0.05. This reads the report's "Paired
comparisons" table, treats each measure's rows as one family (as the compare step now does),
and prints every comparison with its Holm-adjusted p, marking the verdicts that change.
The reports print p to three decimals, too coarse to multiply by 40; each p is recomputed
exactly from the row's discordant counts ("only a / only b", exact McNemar), and the
recomputed p must round to the printed one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loramoe.evaluate.stats import ALPHA, holm_adjust, mcnemar_exact

HEADER = "## Paired comparisons"  # reports since fbf7f10 carry their Holm p already


class NotAReport(ValueError):
    """The file holds no paired-comparisons table to re-read."""


def paired_rows(report: Path) -> list[dict[str, str]]:
    """The rows of the report's paired-comparisons table, as header -> cell."""
    lines = report.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADER)), None)
    if start is None:
        raise NotAReport(f"{report}: no '{HEADER}' section; not a pipeline report.md")
    end = next((i for i, line in enumerate(lines[start + 1:]) if line.startswith("## ")),
               len(lines))
    table = [line for line in lines[start + 1:start + 1 + end] if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    header, rows = cells[0], cells[2:]  # cells[1] is the |---| rule
    return [dict(zip(header, row, strict=True)) for row in rows]


def exact_p(row: dict[str, str]) -> float:
    """The row's exact McNemar p from its discordant counts, checked against the printed p."""
    only_a, only_b = (int(x) for x in row["only a / only b"].split("/"))
    p = mcnemar_exact(only_a, only_b)
    digits = len(row["p"].split(".")[-1]) if "." in row["p"] else 0
    if "e" not in row["p"] and round(p, digits) != float(row["p"]):
        raise ValueError(f"{row['a']} vs {row['b']}: p from {only_a} / {only_b} is {p}, the "
                         f"report prints {row['p']}")
    return p


def reread(report: Path) -> str:
    rows = paired_rows(report)
    if rows and "Holm p" in rows[0]:
        return f"{report}: its verdicts read Holm-adjusted p already (written since fbf7f10)"
    families: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        families.setdefault(row["measure"], []).append(row)
    sizes = ", ".join(f"{len(v)} {k} comparisons" for k, v in families.items())
    out = [f"Holm re-reading of {report} ({sizes}):", "",
           "| measure | kind | a | b | only a / only b | p | Holm p | verdict |",
           "|---|---|---|---|---|---|---|---|"]
    changed = 0
    for measure, family in families.items():
        exact = [exact_p(r) for r in family]
        adjusted = holm_adjust(exact)
        for row, p, p_holm in zip(family, exact, adjusted, strict=True):
            verdict = "significant" if p_holm < ALPHA else "not significant"
            flip = verdict != row["verdict"]
            changed += flip
            mark = f"**{verdict}** (was {row['verdict']})" if flip else verdict
            out.append(f"| {measure} | {row['kind']} | {row['a']} | {row['b']} | "
                       f"{row['only a / only b']} | {p:.3g} | {p_holm:.3g} | {mark} |")
    out.append("")
    out.append(f"{changed} of {len(rows)} verdicts change.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    reports = parser.parse_args().reports
    for report in reports:  # every argument checked before the first is read
        if not report.is_file():
            parser.error(f"{report}: " + ("a folder, not a report" if report.is_dir()
                                          else "no such file"))
    for report in reports:
        try:
            print(reread(report), end="\n\n")
        except NotAReport as err:
            parser.error(str(err))


if __name__ == "__main__":
    main()
