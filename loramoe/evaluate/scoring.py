"""Scores per item, summaries per task and task type, and knowledge retention vs the base.

Knowledge retention is the share of items the *base* model answered correctly that the
fine-tuned model still answers correctly (items joined on id), with its Wilson interval.
Scores per task type carry a stratified-bootstrap interval; a tuned model is compared with
the base on the same items (paired bootstrap). The retained facts' ids let the report
compare two runs on the same facts (stats.paired_binary).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from loramoe.evaluate.metrics import score
from loramoe.evaluate.stats import (
    mean_interval,
    paired_bootstrap,
    stratified_bootstrap,
    wilson_interval,
)

CORRECT = 0.5  # a binary metric's item counts as correct at score >= 0.5


def score_predictions(frame: pd.DataFrame, predictions: list[str]) -> pd.DataFrame:
    """Score each prediction against its item's answers (a list of strings, as read_records
    and the task builders give them; a bare string would be scored per character)."""
    from loramoe.data.records import RecordsError

    scored = frame.copy()
    scored["prediction"] = predictions
    for row, answers in enumerate(scored["answers"]):
        if not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise RecordsError(f"answers of item {scored['id'].iloc[row]!r} (row {row}) must be "
                               f"a list of strings, got {answers!r}; read eval files with "
                               f"loramoe.data.read_records, which normalises them")
    scored["score"] = [score(m, p, a) for m, p, a in
                       zip(scored["metric"], predictions, scored["answers"], strict=True)]
    return scored


def summarize(scored: pd.DataFrame) -> dict[str, Any]:
    per_task = {
        task: {"task_type": group["task_type"].iloc[0], "metric": group["metric"].iloc[0],
               "score": float(group["score"].mean()), "ci": mean_interval(group["score"]),
               "n": int(len(group))}
        for task, group in scored.groupby("task", sort=True)
    }
    out: dict[str, Any] = {"per_task": per_task}
    for task_type in sorted(scored["task_type"].unique()):
        tasks = [t for t, v in per_task.items() if v["task_type"] == task_type]
        # Macro average over tasks, so a large task does not drown the others.
        out[f"{task_type}_score"] = sum(per_task[t]["score"] for t in tasks) / len(tasks)
        of_type = scored[scored["task_type"] == task_type]
        # 95% interval of the same macro average, items resampled within each task
        out[f"{task_type}_score_ci"] = stratified_bootstrap(of_type["score"],
                                                            of_type["task"])["ci"]
    return out


def compare_with_base(base: pd.DataFrame, tuned: pd.DataFrame) -> dict[str, Any]:
    """Tuned minus base per task type on the same items (joined on id): the macro score
    difference with its paired-bootstrap interval, p-value and significance."""
    joined = base[["id", "task", "task_type", "score"]].merge(
        tuned[["id", "score"]], on="id", suffixes=("_base", "_tuned"))
    return {f"{task_type}": paired_bootstrap(group["score_tuned"], group["score_base"],
                                             group["task"])
            for task_type, group in joined.groupby("task_type", sort=True)}


def retention(base: pd.DataFrame, tuned: pd.DataFrame, task_type: str = "knowledge"
              ) -> dict[str, Any]:
    """Share of base-correct items still correct, per task and overall, each with its 95%
    Wilson interval (items joined on id)."""
    joined = base[base["task_type"] == task_type][["id", "task", "score"]].merge(
        tuned[["id", "score"]], on="id", suffixes=("_base", "_tuned"))
    known = joined[joined["score_base"] >= CORRECT]
    kept = known["score_tuned"] >= CORRECT

    def share(mask: pd.Series) -> float | None:
        return float(mask.mean()) if len(mask) else None

    by_task = {task: kept[known["task"] == task] for task in sorted(joined["task"].unique())}
    return {
        "overall": share(kept),
        "ci": wilson_interval(int(kept.sum()), int(len(known))),  # 95% Wilson
        "kept": int(kept.sum()),
        "base_correct": int(len(known)),
        # the facts themselves, so two runs can be compared on the same items (McNemar)
        "known_ids": known["id"].tolist(),
        "kept_ids": known["id"][kept].tolist(),
        "per_task": {task: share(mask) for task, mask in by_task.items()},
        "per_task_ci": {task: wilson_interval(int(mask.sum()), len(mask))
                        for task, mask in by_task.items()},
    }


LONG_ANSWER_WORDS = 8  # a "contains" hit inside a longer sentence, not a short answer


def style_breakdown(base: pd.DataFrame, tuned: pd.DataFrame, tuned_probe: pd.DataFrame
                    ) -> dict[str, Any]:
    """How much of the generation-retention drop is answer style, not knowledge: of the
    knowledge items the base answered right and the tuned model no longer does, the share
    the tuned model still picks by the likelihood probe (it knows the fact, it only says it
    differently); and how many base hits were long sentences that merely contain the gold."""
    joined = base[base["task_type"] == "knowledge"][["id", "prediction", "score"]].merge(
        tuned[["id", "score"]], on="id", suffixes=("_base", "_tuned"))
    known = joined[joined["score_base"] >= CORRECT]
    lost = known[known["score_tuned"] < CORRECT]
    probe_right = set(tuned_probe["id"][tuned_probe["mc_correct"].astype(bool)])
    probed = set(tuned_probe["id"])
    lost_probed = lost[lost["id"].isin(probed)]
    still = int(lost_probed["id"].isin(probe_right).sum())
    long = int((known["prediction"].str.split().str.len() > LONG_ANSWER_WORDS).sum())
    return {"generation_lost": int(len(lost)), "lost_probed": int(len(lost_probed)),
            "lost_still_known": still,
            "lost_still_known_share": still / len(lost_probed) if len(lost_probed) else None,
            "lost_still_known_ci": wilson_interval(still, int(len(lost_probed))),
            "base_long_answers": long, "base_correct": int(len(known))}
