"""The comparison across methods and scales: the results table, and the compare step that
writes it with its tests, claims and plots (plots.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from loramoe.evaluate.cache import scored_otherwise

if TYPE_CHECKING:
    from loramoe.pipeline.markdown import RowCaveat


def _bounds(name: str, ci: list[float] | tuple[float, float] | None) -> dict[str, Any]:
    lo, hi = ci if ci else (None, None)
    return {f"{name}_lo": lo, f"{name}_hi": hi}


def score_columns(m: dict[str, Any]) -> dict[str, Any]:
    """Scores with their 95% bounds, and the downstream difference vs the base (paired)."""
    retention = m.get("retention", {})
    vs_base = m.get("vs_base", {}).get("downstream", {})
    probe, kept = m.get("probe", {}), m.get("probe_retention", {})
    groups = kept.get("groups", {})
    probe_columns = {
        "knowledge_mc": probe.get("mc_accuracy"), **_bounds("knowledge_mc",
                                                            probe.get("mc_accuracy_ci")),
        "probe_retention": kept.get("overall"), **_bounds("probe_retention", kept.get("ci")),
        "probe_base_known": kept.get("base_correct"),
        **{f"{g}_retention": groups.get(g, {}).get("overall") for g in ("trained", "untrained")},
        **{k: v for g in ("trained", "untrained")
           for k, v in _bounds(f"{g}_retention", groups.get(g, {}).get("ci")).items()},
        "logprob_change": kept.get("logprob_change"),
        **_bounds("logprob_change", kept.get("logprob_change_ci"))}
    return {**probe_columns, "knowledge_score": m.get("knowledge_score"),
            **_bounds("knowledge_score", m.get("knowledge_score_ci")),
            "retention": retention.get("overall"), **_bounds("retention", retention.get("ci")),
            "base_known": retention.get("base_correct"),
            "downstream_score": m.get("downstream_score"),
            **_bounds("downstream_score", m.get("downstream_score_ci")),
            "downstream_vs_base": vs_base.get("diff"),
            **_bounds("downstream_vs_base", vs_base.get("ci")),
            "downstream_vs_base_p": vs_base.get("p"),
            "lost_still_known": m.get("style", {}).get("lost_still_known_share"),
            **_bounds("lost_still_known", m.get("style", {}).get("lost_still_known_ci")),
            "router_separation": m.get("router_separation", {}).get("value"),
            **_bounds("router_separation", m.get("router_separation", {}).get("ci"))}


def results_table(branches: list[dict[str, Any]], base_metrics: dict[str, Any]) -> pd.DataFrame:
    base = {**score_columns(base_metrics), "retention": 1.0}
    rows = [{"branch": "base", "method": "base", "scale": 0, "status": "ok", **base}]
    for b in branches:
        if b.get("error"):
            rows.append({"branch": b["name"], "method": b["method_name"], "scale": b["scale"],
                         "status": f"failed: {b['error']}"})
            continue
        # scored on another machine or thread count than the base (a worker of another
        # kind): its numbers vs the base carry that rounding too (evaluate.cache.rounding)
        unlike = scored_otherwise(base_metrics.get("scored_by"), b["metrics"].get("scored_by"))
        rows.append({"branch": b["name"], "method": b["method_name"], "scale": b["scale"],
                     "seed": b.get("seed"), "status": "ok", **score_columns(b["metrics"]),
                     "scored_otherwise": unlike})
    return with_holm_vs_base(pd.DataFrame(rows))


def with_holm_vs_base(table: pd.DataFrame) -> pd.DataFrame:
    """Every branch's downstream gain over the base is one family: its Holm-adjusted p and
    whether that is < 0.05 (`downstream_vs_base_significant`)."""
    from loramoe.evaluate.stats import ALPHA, holm_adjust

    if "downstream_vs_base_p" not in table:  # every branch failed
        return table
    raw = [None if pd.isna(p) else float(p) for p in table["downstream_vs_base_p"]]
    adjusted = holm_adjust(raw)
    table["downstream_vs_base_p_holm"] = adjusted
    table["downstream_vs_base_significant"] = [None if p is None else p < ALPHA
                                               for p in adjusted]
    return table


def compare_branches(outcomes: list[dict[str, Any]], base_metrics: dict[str, Any],
                     parent_run_id: str, out: Path, config=None,
                     wall_seconds: float | None = None,
                     shortfall: dict[str, int] | None = None) -> dict[str, Any]:
    """The comparison step: results table, paired tests, paper claims, plots and the
    markdown report (report.md, written from these numbers), logged to the MLflow parent run
    (artifacts under compare/, each branch's scores as `branch/metric`)."""
    from loramoe.pipeline.claims import paper_claims
    from loramoe.pipeline.markdown import write_report
    from loramoe.pipeline.paired import paired_comparisons
    from loramoe.pipeline.plots import comparison_plots
    from loramoe.tracking import log_metrics, store_folder

    out.mkdir(parents=True, exist_ok=True)
    # by scale (the foreach runs the largest first); stable, so methods keep config order
    outcomes = sorted(outcomes, key=lambda b: b["scale"])
    table = results_table(outcomes, base_metrics)
    paired = paired_comparisons(outcomes)
    claims = paper_claims(outcomes)
    plots = comparison_plots(table, outcomes, out)
    table.to_csv(out / "results.csv", index=False)
    paired.to_csv(out / "paired.csv", index=False)
    claims.to_csv(out / "claims.csv", index=False)
    files = [*plots, out / "results.csv", out / "paired.csv", out / "claims.csv"]
    replicates = write_replicates(outcomes, out)
    files += [out / "replicates.csv", out / "replicate_tests.csv"] if replicates else []
    if config is not None:
        trained_on = sorted({o["trained"]["hardware"] for o in outcomes
                             if not o["error"] and "hardware" in o.get("trained", {})})
        files.append(write_report(out / "report.md", config, table, paired, claims, plots,
                                  f"LoRAMoE study: {config.name}", wall_seconds, shortfall,
                                  replicates, base_metrics.get("scored_by"), trained_on,
                                  row_caveats(outcomes)))
    store_folder(parent_run_id, files, "compare")
    rows = table.to_dict(orient="records")
    tuned = [r for r in rows if r["status"] == "ok" and r["method"] != "base"]
    log_metrics(parent_run_id, {f"{r['branch']}/{k}": r[k] for r in tuned
                                for k in LOGGED if r.get(k) is not None})
    return {"rows": rows, "plots": plots,
            "paired": paired.to_dict(orient="records"),
            "claims": claims.to_dict(orient="records"),
            "report": out / "report.md" if config is not None else None,
            "failed": [r["branch"] for r in rows if r["status"] != "ok"]}


def row_caveats(outcomes: list[dict[str, Any]]) -> dict[str, RowCaveat]:
    """branch -> its RowCaveat, for the branches where any count is not 0: a branch labelled
    with its scale trained on fewer examples than the label says, on responses that never
    reach their end-of-turn marker, or on turns that end where a text mentions the marker."""
    from loramoe.pipeline.markdown import RowCaveat

    cut = {}
    for o in outcomes:
        final = o.get("trained", {}).get("final", {})  # none on a failed branch
        dropped, short = final.get("examples_dropped", 0), final.get("examples_truncated", 0)
        control = final.get("examples_with_control_text", 0)
        if dropped or short or control:
            cut[o["name"]] = RowCaveat(dropped, short, control, final["examples"] + dropped)
    return cut


class NothingTrained(RuntimeError):
    """Every branch of the run failed: the run has nothing to compare or register."""


def check_some_trained(rows: list[dict[str, Any]]) -> None:
    """NothingTrained when no branch trained and was scored (`rows`: compare's results
    table), so that such a run exits non-zero once its report and MLflow runs are written:
    it used to end "successfully", a scheduled retraining showing green with nothing
    trained."""
    tuned = [r for r in rows if r["method"] != "base"]
    if tuned and all(r["status"] != "ok" for r in tuned):
        first = "; ".join(f"{r['branch']}: {r['status'].removeprefix('failed: ')[:200]}"
                          for r in tuned[:3])
        raise NothingTrained(f"every branch failed ({len(tuned)} of {len(tuned)}), e.g. "
                             f"{first}. The report and each branch's log say more")


def write_replicates(outcomes: list[dict[str, Any]], out: Path) -> str:
    """When a (method, scale) trained with several seeds: the pooled scores and comparisons
    (replicates.csv, replicate_tests.csv) and their report section; else nothing."""
    from loramoe.pipeline import replicates
    from loramoe.pipeline.markdown import replicates_section

    if not replicates.has_replicates(outcomes):
        return ""
    pooled = replicates.replicate_table(outcomes)
    tests = replicates.replicate_comparisons(outcomes)
    pooled.to_csv(out / "replicates.csv", index=False)
    tests.to_csv(out / "replicate_tests.csv", index=False)
    return replicates_section(pooled, tests)


def task_columns(per_task: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each task's score with its 95% bounds, as MLflow metrics `task/<name>[_lo|_hi]`."""
    columns = {}
    for task, entry in per_task.items():
        columns[f"task/{task}"] = entry["score"]
        columns.update(_bounds(f"task/{task}", entry.get("ci")))
    return columns


LOGGED = [f"{name}{suffix}" for name in (
    "knowledge_score", "retention", "downstream_score", "downstream_vs_base", "knowledge_mc",
    "probe_retention", "trained_retention", "untrained_retention", "logprob_change",
    "lost_still_known", "router_separation")
    for suffix in ("", "_lo", "_hi")]
