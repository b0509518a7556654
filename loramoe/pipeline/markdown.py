"""The run's results report as markdown, written by the compare step from the run's own
numbers (no hand-copied figures): setup, the results table with 95% intervals, the paired
comparisons, router type separation, and the paper-claims table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from loramoe.evaluate.stats import ROUNDS
from loramoe.pipeline.numbers import bounds, p_value, score, with_interval


def cell(value, digits: int = 3) -> str:
    """A table cell: floats to `digits` places, "–" for a missing value."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def with_ci(row: pd.Series, column: str, signed: bool = False) -> str:
    """A frame's `column` with its `column`_lo and _hi: 0.839 [0.823, 0.854]."""
    return with_interval(*(row.get(c) for c in (column, f"{column}_lo", f"{column}_hi")),
                         signed=signed)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


RESULT_COLUMNS = [  # (header, column, signed)
    ("knowledge MC (probe)", "knowledge_mc", False),
    ("probe retention", "probe_retention", False),
    ("trained relations", "trained_retention", False),
    ("untrained relations", "untrained_retention", False),
    ("Δ gold log-prob", "logprob_change", True),
    ("generation retention", "retention", False),
    ("downstream", "downstream_score", False),
    ("downstream vs base", "downstream_vs_base", True),
    ("generation losses the probe still knows", "lost_still_known", False),
    ("router separation", "router_separation", True),
]


RESULT_HEADERS = ["branch", "scale", *(h for h, _, _ in RESULT_COLUMNS)]


def result_rows(results: pd.DataFrame) -> list[list[str]]:
    """The results table's rows as the report prints them (RESULT_HEADERS): each score with
    its 95% interval; a failed branch's status in place of its scores."""
    rows = []
    for _, row in results.iterrows():
        if row["status"] != "ok":
            rows.append([row["branch"], cell(row["scale"]), row["status"],
                         *[""] * (len(RESULT_COLUMNS) - 1)])
            continue
        rows.append([row["branch"], cell(row["scale"]),
                     *(with_ci(row, c, s) for _, c, s in RESULT_COLUMNS)])
    return rows


def results_section(results: pd.DataFrame) -> str:
    rows = result_rows(results)
    base = results[results["method"] == "base"]
    known = int(base["probe_base_known"].iloc[0]) if len(base) and pd.notna(
        base["probe_base_known"].iloc[0]) else None
    first = results[(results["method"] != "base") & results["probe_base_known"].notna()]
    known = known or (int(first["probe_base_known"].iloc[0]) if len(first) else None)
    note = (f"Probe retention is the share of the {known} facts the base model got right by "
            f"multiple choice that the tuned model still gets right (Wilson 95% interval). "
            if known else "")
    return ("## Results (95% intervals)\n\n" + note + "Downstream: macro score over tasks, "
            "bootstrap over items; vs base: paired bootstrap on the same items. Generation losses "
            "the probe still knows: of the facts the base answered right by generation and "
            "the tuned model no longer does, the share the tuned model still picks by the "
            "probe — answer style, not lost knowledge. Router "
            "separation: weight on the knowledge experts on knowledge tasks minus on downstream "
            "tasks (> 0: the router routes by type).\n\n" + table(RESULT_HEADERS, rows)
            + scored_otherwise_note(results))


def scored_otherwise_note(results: pd.DataFrame) -> str:
    """Branches evaluated with other settings than the base (another thread count or machine,
    e.g. workers of other kinds), named: their numbers vs the base carry that rounding."""
    if "scored_otherwise" not in results:
        return ""
    unlike = [f"`{r['branch']}` ({r['scored_otherwise']})" for _, r in results.iterrows()
              if isinstance(r["scored_otherwise"], str) and r["scored_otherwise"]]
    if not unlike:
        return ""
    return ("\n\n**Scored otherwise than the base**: " + ", ".join(unlike) + ". Their retention "
            "and differences from the base (and from branches scored as the base was) carry "
            "that rounding besides the training's effect: in bf16 a thread count of 1 vs 2 "
            "alone moved 3 % of the default eval's item scores (docs/benchmarks.md §3).")


PAIRED_HEADERS = ["measure", "kind", "a", "b", "items", "a − b", "95% CI", "only a / only b",
                  "p", "Holm p", "verdict"]


def paired_rows(paired: pd.DataFrame) -> list[list[str]]:
    """paired.csv's records as the report prints them (PAIRED_HEADERS): '–' where a test
    has no value (a downstream row has no discordant counts)."""

    def discordant(r) -> str:
        return "–" if r["only_a"] is None or pd.isna(r["only_a"]) else \
            f"{int(r['only_a'])} / {int(r['only_b'])}"

    return [[r["measure"], r["comparison"], r["a"], r["b"], cell(r["items"]),
             score(r["diff"], signed=True), bounds(r["diff_lo"], r["diff_hi"], signed=True),
             discordant(r), p_value(r["p"]), p_value(r["p_holm"]),
             r["verdict"]] for _, r in paired.iterrows()]


def paired_section(paired: pd.DataFrame) -> str:
    if not len(paired):
        return ""
    sizes = paired.groupby("measure", sort=False).size()
    families = ", ".join(f"{n} for {m}" for m, n in sizes.items())
    return ("## Paired comparisons (same items)\n\n"
            "Retention: exact McNemar on the base-known facts (only a / only b: facts one of "
            "the two kept; 95% interval of a − b by Newcombe's square-and-add of the two "
            "Wilson intervals, corrected for the pairing). Downstream: macro score, paired "
            "bootstrap over the same items stratified by task (95% interval of a − b; "
            f"{ROUNDS:,} rounds, so its p is at "
            f"least {2 / (ROUNDS + 1):.4f}). Each measure's comparisons are one "
            f"family ({families}); the verdict reads the Holm-adjusted p (family-wise error "
            "≤ 5 %); the raw p and each test's own 95% interval (not Holm-adjusted) are "
            "beside it.\n\n" +
            table(PAIRED_HEADERS, paired_rows(paired)))


def replicates_section(pooled: pd.DataFrame, comparisons: pd.DataFrame) -> str:
    """Scores and comparisons pooled over training seeds (replicates.py)."""
    if not len(pooled):
        return ""
    measures = [m for m in ("probe_retention", "downstream") if m in pooled]
    rows = [[r["method"], cell(r["scale"]), r["seeds"],
             *(f"{with_ci(r, m)} ({r[f'{m}_per_seed']})" for m in measures)]
            for _, r in pooled.iterrows()]
    tests = [[r["measure"], r["comparison"], r["a"], r["b"], r["seeds"], cell(r["items"]),
              with_ci(r, "diff", signed=True), r["per_seed"], p_value(r["p"]),
              p_value(r["p_holm"]), r["verdict"]]
             for _, r in comparisons.iterrows()]
    return ("## Across training seeds\n\nEach (method, scale) trained once per seed; every "
            "score and difference pooled over the seeds with seeds and items resampled "
            f"together (crossed bootstrap, {ROUNDS:,} rounds), so its 95% interval covers "
            "training noise as well as the choice of items; two methods are paired by seed "
            "and by item. Each seed's own value in parentheses. With two or three seeds the "
            "seed part of an interval is coarse: read the per-seed values beside it. Each "
            "measure's comparisons are one Holm family.\n\n" +
            table(["method", "scale", "seeds", *(m.replace("_", " ") + " (per seed)"
                                                  for m in measures)], rows) +
            ("\n\n" + table(["measure", "kind", "a", "b", "seeds", "items",
                               "a − b [95% CI]", "per seed", "p", "Holm p", "verdict"], tests)
             if tests else ""))


def claims_section(claims: pd.DataFrame) -> str:
    rows = [[r["claim"], r["paper"], r["ours"], f"**{r['verdict']}**"]
            for _, r in claims.iterrows()]
    family = int(claims["tests_in_family"].iloc[0]) if "tests_in_family" in claims and \
        len(claims) else 0
    return ("## Paper claims\n\nEach claim tested on this run at the largest scale the roles "
            "share; *inconclusive* means the 95% interval or paired test cannot tell. The "
            f"paired tests behind the verdicts ({family}: McNemar on retention, paired "
            "bootstrap on downstream) are one family: a verdict reads its Holm-adjusted p. "
            "The downstream-margin and router-separation rows read their 95% interval "
            "against the stated margin. Where the roles were trained with several seeds, a "
            "test pools the seeds both share (crossed bootstrap over seeds and items; the "
            "row says so and gives each seed's value) and a separation row must hold for "
            "every seed.\n\n" +
            table(["claim", "paper", "this run", "verdict"], rows))


def scored_where(config, base_scored_by: dict[str, str] | None) -> str:
    """"bfloat16 on <GPU or CPU>": how the base (and so every branch, like for like) was
    scored, by its `scored_by`; without it, how this machine would. The compare step may run
    on a plain worker while the branches ran on GPUs: its own device says nothing of theirs."""
    if base_scored_by and "settings" in base_scored_by:
        settings = json.loads(base_scored_by["settings"])
        where = settings.get("gpu") or settings.get("cpu") or settings.get("device", "?")
        return f"{settings.get('dtype', '?')} on {where}"
    from loramoe.precision import default_device, hardware_name, resolve_dtype

    first, device = next(iter(config.methods.values())), default_device()
    dtype = str(resolve_dtype(first.dtype, device)).removeprefix("torch.")
    return f"{dtype} on {hardware_name(device)} (this machine; the base did not say)"


class RowCaveat(NamedTuple):
    """A branch's training rows that did not train as they read (report.row_caveats)."""

    cut_away: int  # prompt as long as max_length or longer: trained without the row
    cut_short: int  # trained without its end-of-turn marker
    control_text: int  # holds a control token's text, read as the token
    rows: int  # rows read, before any was cut away


def _cut_counts(cut: dict[str, RowCaveat]) -> str:
    """'loramoe-256 66 of 256 cut away, 12 cut short; lora-256 3 cut short'"""
    counts = []
    for branch, c in cut.items():
        said = ([f"{c.cut_away:,} of {c.rows:,} cut away"] if c.cut_away else []) + (
            [f"{c.cut_short:,} cut short"] if c.cut_short else [])
        if said:
            counts.append(f"{branch} {', '.join(said)}")
    return "; ".join(counts)


def _caveat_lines(caveats: dict[str, RowCaveat]) -> list[str]:
    """The setup lines for rows a branch did not train on as they read (report.row_caveats)."""
    lines = []
    if cut := _cut_counts(caveats):  # a branch's label, when max_length cut rows away or short
        lines.append(f"- **Cut by max_length** (cut away: prompt that long or longer, trained "
                     f"without them; cut short: trained without their end-of-turn marker): "
                     f"{cut}")
    if control := "; ".join(f"{branch} {c.control_text:,} of {c.rows:,}"
                            for branch, c in caveats.items() if c.control_text):
        lines.append(f"- **Control-token text in training rows** (e.g. '<|im_end|>' in a "
                     f"response: the tokenizer reads it as the token, and the row trains a turn "
                     f"that ends there; the train step's log names the rows): {control}")
    return lines


def setup_section(config, wall_seconds: float | None,
                  shortfall: dict[str, int] | None = None,
                  base_scored_by: dict[str, str] | None = None,
                  trained_on: list[str] | None = None,
                  caveats: dict[str, RowCaveat] | None = None) -> str:
    mixture = config.mixture
    methods = ", ".join(f"`{n}` ({c.method}" + (f", β = {c.loramoe.lbc_beta}, "
                                                 f"{c.loramoe.lbc_form}/{c.loramoe.lbc_load}"
                                                 if c.method == "loramoe" else "") + ")"
                        for n, c in config.methods.items())
    trained = [t.name for t in mixture.tasks if t.train]
    untrained = [t.name for t in mixture.tasks if not t.train]
    first = next(iter(config.methods.values()))
    lines = [f"- Config `{config.name}`: model `{first.model}`, dtype `{first.dtype}` "
             f"(= {scored_where(config, base_scored_by)}), "
             f"batch {first.batch_size}, epochs {first.epochs}, max_length {first.max_length}",
             f"- Methods: {methods}", f"- Scales (nested): {mixture.scales}" + (
                 f", knowledge share {mixture.knowledge_share}" if mixture.knowledge_share
                 is not None else ""),
             f"- Trained tasks: {', '.join(trained)}",
             f"- Eval-only relations: {', '.join(untrained) or 'none'}"]
    if trained_on:  # GPU names, or CPUs with their flags: bf16 rounds per kind
        lines.append(f"- Trained on: {'; '.join(trained_on)}")
    if shortfall:  # a scale's label is what was asked; say what the data could not supply
        short = ", ".join(f"{task} {n:,}" for task, n in sorted(shortfall.items()))
        lines.append(f"- **Short of data**: records a task could not supply at the largest "
                     f"scale ({short}); its branches trained on what there was")
    lines += _caveat_lines(caveats or {})  # rows a branch's label does not say
    if wall_seconds is not None:
        lines.append(f"- Wall time to the compare step: {wall_seconds:,.0f} s")
    return "## Setup\n\n" + "\n".join(lines)


def write_report(path: Path, config, results: pd.DataFrame, paired: pd.DataFrame,
                 claims: pd.DataFrame, plots: list[Path], title: str,
                 wall_seconds: float | None = None,
                 shortfall: dict[str, int] | None = None, replicates: str = "",
                 base_scored_by: dict[str, str] | None = None,
                 trained_on: list[str] | None = None,
                 caveats: dict[str, RowCaveat] | None = None) -> Path:
    figures = "\n\n".join(f"![{p.stem}]({p.name})" for p in plots)
    parts = [f"# {title}",
             setup_section(config, wall_seconds, shortfall, base_scored_by, trained_on, caveats),
             results_section(results), replicates,
             claims_section(claims), paired_section(paired), "## Figures\n\n" + figures]
    path.write_text("\n\n".join(p for p in parts if p) + "\n")
    return path
