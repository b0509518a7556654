"""The current champion: whether its scores can be paired with a new adapter's (the same
eval records, evaluation code and settings), its evaluation again when they cannot (kept for
later runs), and the challenge a new adapter must win to take its alias."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from loramoe.pipeline.config import PipelineConfig
from loramoe.pipeline.numbers import bounds, p_value, score
from loramoe.pipeline.steps import TRAINED, restore_run_dir

SCORED_BY_TAGS = {"records": "eval_records", "code": "eval_code", "settings": "eval_settings"}
# why a champion's scores cannot be paired with a branch's, by the version tag that differs
DIFFERS = {"eval_records": "it was evaluated on other eval records",
           "eval_code": "it was scored by other evaluation code (loramoe/evaluate, the prompt "
                        "formatting, or the torch/transformers versions)",
           "eval_settings": "it was scored with other evaluation settings"}


def scored_by_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """The version tags that say what scored an evaluation (evaluate()'s `metrics`): its eval
    records, evaluation code and settings (loramoe/evaluate/run.py, `scored_by`); {} for one
    from before evaluations recorded them."""
    found = metrics.get("scored_by") or {}
    return {tag: found[key] for key, tag in SCORED_BY_TAGS.items() if key in found}


def not_comparable(champion_tags: dict[str, str], scored_by: dict[str, str]) -> str:
    """Why scores of the champion's version and of a branch scored as `scored_by` (tags,
    `scored_by_tags`) cannot be paired, or ''."""
    if len(scored_by) < len(SCORED_BY_TAGS):
        return "this run does not record what scored it"
    if any(tag not in champion_tags for tag in SCORED_BY_TAGS.values()):
        return "its version does not record what scored it"
    for tag, why in DIFFERS.items():
        if champion_tags[tag] != scored_by[tag]:
            return why + (f" ({champion_tags[tag]} vs {scored_by[tag]})"
                          if tag == "eval_settings" else "")
    return ""


def current_champion(name: str, scored_by: dict[str, str], workdir: Path
                     ) -> dict[str, Any] | None:
    """The version the alias `champion` of `name` points to: {"version", "run_id", "score",
    "items", "why_not", "note"}. items: its per-item scores (id, task, task_type, score),
    read from its run's eval/metrics.json when it was scored as `scored_by` says (the same
    eval records, evaluation code and settings, `scored_by_tags`), else from its evaluation
    again under `scored_by` that an earlier run stored (`stored_rescore`), else None and
    why_not says why; note: how it was scored again. None when there is no champion yet."""
    from loramoe.tracking import alias_version

    found = alias_version(name, "champion")
    if found is None:
        return None
    tags = found["tags"]
    champion = {"version": found["version"], "run_id": found["run_id"], "items": None,
                "why_not": not_comparable(tags, scored_by), "note": "",
                "score": float(tags["downstream_score"]) if "downstream_score" in tags else None}
    if champion["why_not"]:
        return stored_rescore(champion, tags, scored_by, workdir)
    try:
        metrics = read_scores(found["run_id"], "eval/metrics.json", workdir / "champion")
        champion["items"] = pd.DataFrame(metrics["item_scores"])
    except Exception as error:  # a deleted run, another store, no file: not comparable
        champion["why_not"] = (f"its scores could not be read from run {found['run_id']} "
                               f"({type(error).__name__}: {error})")
    return champion


def read_scores(run_id: str, path: str, workdir: Path) -> dict[str, Any]:
    """A metrics.json that evaluate() wrote, read from an MLflow run's artifacts."""
    from loramoe.tracking import fetch_folder

    return json.loads(Path(fetch_folder(run_id, path, workdir)).read_text())


def rescored_tag(scored_by: dict[str, str]) -> str:
    """The champion version's tag that points to its scores evaluated again as `scored_by`
    says (one tag per way of scoring; `keep_rescore` sets it)."""
    digest = hashlib.sha256(json.dumps(scored_by, sort_keys=True).encode()).hexdigest()
    return f"rescored_{digest[:16]}"


def stored_rescore(champion: dict[str, Any], tags: dict[str, str], scored_by: dict[str, str],
                   workdir: Path) -> dict[str, Any]:
    """The champion with the scores an earlier run's register step got by evaluating it
    again as `scored_by` says (its version's `rescored_tag`): a champion scored otherwise is
    evaluated again once per way of scoring, not in every later run (on a GPU schedule,
    a 7B evaluation each time). As it was when there are none or they cannot be read."""
    pointer = tags.get(rescored_tag(scored_by))
    if not pointer:
        return champion
    try:
        where = json.loads(pointer)
        metrics = read_scores(where["run_id"], where["path"], workdir / "champion_rescored")
    except Exception:  # that run deleted, another store: it is evaluated again instead
        return champion
    if not_comparable(scored_by_tags(metrics), scored_by):
        return champion
    return scored_again(champion, metrics, f"in run {where['run_id']}")


def scored_again(champion: dict[str, Any], metrics: dict[str, Any], where: str
                 ) -> dict[str, Any]:
    """The champion with the scores of its evaluation again (evaluate()'s `metrics`, already
    found comparable), the note saying `where` it was evaluated and why."""
    return {**champion, "items": pd.DataFrame(metrics["item_scores"]), "why_not": "",
            "score": metrics["downstream_score"],
            "note": f", evaluated again {where}: {champion['why_not']}"}


def keep_rescore(name: str, champion: dict[str, Any], scored_by: dict[str, str],
                 run_id: str) -> None:
    """Store the champion's scores from `reevaluate_champion` in run `run_id` and point its
    version's `rescored_tag` to them, for later runs scored the same way."""
    from loramoe.tracking import set_version_tag, store_folder

    folder = store_folder(run_id, [champion["rescored"]], f"champion_again/v{champion['version']}")
    set_version_tag(name, champion["version"], rescored_tag(scored_by),
                    json.dumps({"run_id": run_id, "path": f"{folder}/metrics.json"}))


def reevaluate_champion(config: PipelineConfig, champion: dict[str, Any],
                        eval_frame: pd.DataFrame, scored_by: dict[str, str], workdir: Path
                        ) -> dict[str, Any]:
    """A champion whose scores cannot be paired with this run's (`current_champion`'s
    why_not), evaluated again here: its trained folder from its run, this run's eval records,
    code and settings. Its items and score replace the old ones when the new evaluation is
    comparable ("rescored": the new metrics.json, for `keep_rescore`); otherwise, or when it
    fails (its run's files or its base model gone), the champion is returned as it was,
    why_not saying what happened."""
    from loramoe.data.records import write_records
    from loramoe.evaluate import evaluate
    from loramoe.pipeline.threads import check_gpus, use_branch_threads

    here = workdir / "champion_again"
    # a branch's thread count, as this run's branches were scored (cache.rounding)
    use_branch_threads(config)
    try:
        check_gpus(config, evaluation=True)  # not hours on a CPU for unpairable scores
        run_dir = restore_run_dir({"store": {"mlflow_run_id": champion["run_id"],
                                             "artifact_path": TRAINED}}, here / "run")
        metrics = evaluate(write_records(eval_frame, here / "eval.jsonl"), here / "eval",
                           run=run_dir, batch_size=config.eval_batch_size, progress=False,
                           generate_per_task=config.eval_generate_per_task)
    except Exception as error:  # its run's files gone, its base model not found
        return {**champion, "why_not": f"{champion['why_not']}, and evaluating it again here "
                                       f"failed ({type(error).__name__}: {error})"}
    again = not_comparable(scored_by_tags(metrics), scored_by)
    if again:
        return {**champion, "why_not": f"{champion['why_not']}; evaluated again here, {again}"}
    return {**scored_again(champion, metrics, "here"),
            "rescored": here / "eval" / "metrics.json"}


def challenge(best: dict[str, Any], earned_ones: list[dict[str, Any]], champion: dict[str, Any],
              rule: str) -> tuple[bool, str]:
    """Whether `best` (chosen among `earned_ones`) takes the alias from the current
    `champion` (see `current_champion`), and why.

    significant: its downstream score beats the champion's on the same items — the paired
    bootstrap's p, Holm-adjusted over every candidate that earned promotion (each is tested
    against the champion), is below 0.05 and the difference positive. best: the point score
    is higher. Scores measured on other eval records, by other evaluation code or with other
    settings are not compared: the alias stays.
    """
    from loramoe.evaluate.scoring import compare_with_base
    from loramoe.evaluate.stats import ALPHA, holm_adjust

    version, items = champion["version"], champion["items"]
    if items is None:
        return False, (f" — not compared with the current champion (version {version}): "
                       f"{champion['why_not']}; it keeps the alias (move it by hand if this "
                       f"adapter should serve)")
    if rule == "best":
        mine, current = best["metrics"]["downstream_score"], champion["score"]
        if current is None or mine > current:
            return True, (f" — beats current champion (version {version}{champion['note']}, "
                          f"{score(current)})")
        return False, (f" — does not beat current champion (version {version}"
                       f"{champion['note']}, {score(current)})")
    tests = [compare_with_base(items, pd.DataFrame(b["metrics"]["item_scores"]))
             .get("downstream") or {} for b in earned_ones]
    adjusted = holm_adjust([t.get("p") for t in tests])
    index = next(i for i, b in enumerate(earned_ones) if b is best)
    test, p_holm = tests[index], adjusted[index]
    text = (f"downstream {score(test.get('diff'), signed=True)} vs current champion "
            f"(version {version}{champion['note']}; 95% CI {diff_bounds(test.get('ci'))}, "
            f"Holm p {p_value(p_holm)} over "
            f"{len(earned_ones)} tested)")
    if p_holm is not None and p_holm < ALPHA and (test.get("diff") or 0) > 0:
        return True, f" — beats current champion: {text}"
    return False, f" — does not beat current champion significantly: {text}"


def diff_bounds(ci) -> str:
    """A difference's 95% interval, [+0.083, +0.267], or "–" without one."""
    return bounds(*(ci or (None, None)), signed=True)
