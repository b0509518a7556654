"""The champion rule and the MLflow Model Registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from loramoe.pipeline.champion import (
    SCORED_BY_TAGS,
    challenge,
    current_champion,
    diff_bounds,
    keep_rescore,
    reevaluate_champion,
    scored_by_tags,
)
from loramoe.pipeline.config import PipelineConfig
from loramoe.pipeline.numbers import p_value, score
from loramoe.pipeline.steps import restore_run_dir


def retention_measure(branch: dict[str, Any]) -> dict[str, Any]:
    """The retention the rule judges: the probe's (every base-known fact, no answer style)
    when the eval has one, else generation retention (a user's eval file without choices)."""
    metrics = branch["metrics"]
    probe = metrics.get("probe_retention") or {}
    if probe.get("base_correct"):
        found, name = probe, "probe retention"
    else:
        found, name = metrics.get("retention") or {}, "generation retention"
    ci = found.get("ci")
    return {"name": name, "value": found.get("overall"), "low": ci[0] if ci else None,
            "facts": found.get("base_correct")}


def unreachable(measure: dict[str, Any], threshold: float) -> str:
    """Why the threshold cannot be met on this many facts (even all kept), or ''."""
    from loramoe.evaluate.stats import wilson_interval

    n = measure["facts"]
    if not n or threshold <= 0:
        return ""
    best = wilson_interval(n, n)[0]
    return (f"; unreachable on {n} facts: keeping all of them gives a lower bound of "
            f"{score(best)}") if best < threshold else ""


def earned(branch: dict[str, Any], threshold: float, rule: str,
           p_holm: float | None) -> tuple[bool, str]:
    """Whether one branch may be champion under the rule, and why (or why not).

    significant: downstream beats the base on the same items — the paired bootstrap's p,
    Holm-adjusted over every candidate tested (`p_holm`; None: no test), is below
    0.05 and the difference is positive — and the retention's 95% lower bound is >=
    threshold. best: the point retention is >= threshold (mechanics tests on random models,
    where nothing is significant). Retention is the probe's when there is one
    (`retention_measure`).
    """
    from loramoe.evaluate.stats import ALPHA

    name, measure = branch["name"], retention_measure(branch)
    retention, low, kind = measure["value"], measure["low"], measure["name"]
    if rule == "best":
        ok = threshold == 0 or (retention is not None and retention >= threshold)
        return ok, f"{name}: {kind} {score(retention)} vs threshold {threshold}"
    vs_base = branch["metrics"].get("vs_base", {}).get("downstream") or {}
    if p_holm is None or p_holm >= ALPHA or not vs_base.get("diff") or vs_base["diff"] <= 0:
        return False, (f"{name}: downstream vs base {score(vs_base.get('diff'), signed=True)}"
                       f" (95% CI {diff_bounds(vs_base.get('ci'))}, Holm p {p_value(p_holm)})"
                       f" is not a significant gain")
    if threshold > 0 and (low is None or low < threshold):
        return False, (f"{name}: {kind} lower bound {score(low)} < threshold "
                       f"{threshold}{unreachable(measure, threshold)}")
    return True, (f"{name}: downstream {score(vs_base['diff'], signed=True)} vs base (95% CI "
                  f"{diff_bounds(vs_base['ci'])}, Holm p {p_value(p_holm)}), {kind} "
                  f"{score(retention)} (lower bound {score(low)} >= {threshold})")


def verdicts(branches: list[dict[str, Any]], threshold: float, rule: str
             ) -> list[tuple[dict, bool, str]]:
    """(branch, earned, why) for every successful LoRAMoE branch (see `earned`). Every
    candidate's gain over the base is tested, so their p-values are one Holm family: picking
    the best of six is not six chances at a lucky "significant"."""
    from loramoe.evaluate.stats import holm_adjust

    candidates = [b for b in branches if not b.get("error") and b["method"] == "loramoe"]
    adjusted = holm_adjust([(b["metrics"].get("vs_base", {}).get("downstream") or {}).get("p")
                            for b in candidates])
    return [(b, *earned(b, threshold, rule, p_holm))
            for b, p_holm in zip(candidates, adjusted, strict=True)]


def choose_candidate(branches: list[dict[str, Any]], threshold: float,
                     rule: str = "significant") -> tuple[dict | None, str]:
    """Best LoRAMoE by downstream score among the branches that earned it (`verdicts`);
    none is a valid outcome, and the reason lists every branch's verdict."""
    return choose_among(verdicts(branches, threshold, rule), rule)


def choose_among(judged: list[tuple[dict, bool, str]], rule: str) -> tuple[dict | None, str]:
    """`choose_candidate` given the `verdicts` already."""
    if not judged:
        return None, "no successful LoRAMoE branch"
    keeping = [b for b, ok, _ in judged if ok]
    if not keeping:
        return None, f"no LoRAMoE branch earned promotion (rule {rule}): " + "; ".join(
            why for _, _, why in judged)
    best = max(keeping, key=lambda b: b["metrics"]["downstream_score"])
    why = next(why for b, _, why in judged if b is best)
    tested = f"{len(judged)} candidate{'s' if len(judged) != 1 else ''}"
    # The highest of several measured gains is biased upwards (the winner's curse).
    optimistic = (f"; the highest of the {len(keeping)} that earned it, so its gain is an "
                  f"optimistic estimate" if len(keeping) > 1 else "")
    return best, (f"{why} (rule {rule}, {tested}; best downstream "
                  f"{score(best['metrics']['downstream_score'])}{optimistic})")


def register_champion(config: PipelineConfig, branches: list[dict[str, Any]],
                      parent_run_id: str, workdir: Path,
                      eval_frame: pd.DataFrame | None = None) -> dict[str, Any]:
    """Log every adapter as a pyfunc model; register the best LoRAMoE that earned it
    (`verdicts`, `choose_among`) and give it the alias `champion` if there is none yet, or if it
    beats the current champion on the same eval records, scored by the same code and
    settings (`challenge`). A champion scored otherwise is evaluated again on `eval_frame`
    (this run's eval records; None: not) when it can be (`reevaluate_champion`), and those
    scores are kept for later runs (`keep_rescore`)."""
    from loramoe.serving.pyfunc import log_answer_model
    from loramoe.tracking import log_metrics, register_version, set_alias, set_tag

    logged = {}
    for b in branches:
        if b.get("error") or not b.get("mlflow_run_id"):
            continue
        run_dir = restore_run_dir(b["trained"], workdir / b["name"] / "run")
        logged[b["name"]] = log_answer_model(b["mlflow_run_id"], run_dir,
                                             workdir / b["name"] / "staged",
                                             batch_size=config.eval_batch_size)
    rule = config.champion_rule
    judged = verdicts(branches, config.retention_threshold, rule)
    best, reason = choose_among(judged, rule)
    decision: dict[str, Any] = {"candidate": best["name"] if best else None, "reason": reason,
                                "promoted": False, "logged_models": logged}
    if best is not None:
        scored_by = scored_by_tags(best["metrics"])
        champion = current_champion(config.registered_model, scored_by, workdir)
        if champion is not None and champion["items"] is None and eval_frame is not None \
                and len(scored_by) == len(SCORED_BY_TAGS):
            champion = reevaluate_champion(config, champion, eval_frame, scored_by, workdir)
            if champion.get("rescored"):
                keep_rescore(config.registered_model, champion, scored_by, parent_run_id)
        tags = {"downstream_score": str(best["metrics"]["downstream_score"]), **scored_by}
        version = register_version(logged[best["name"]], config.registered_model, tags)
        decision["version"] = version
        if champion is None:
            promoted, why = True, " — first champion"
        else:
            earned_ones = [b for b, ok, _ in judged if ok]
            promoted, why = challenge(best, earned_ones, champion, rule)
        if promoted:
            set_alias(config.registered_model, "champion", version)
        decision["promoted"], decision["reason"] = promoted, decision["reason"] + why
    set_tag(parent_run_id, "champion_decision", decision["reason"])
    log_metrics(parent_run_id, {"champion_promoted": float(decision["promoted"])})
    return decision
