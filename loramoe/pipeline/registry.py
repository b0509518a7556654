"""The champion rule and the MLflow Model Registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramoe.pipeline.config import PipelineConfig
from loramoe.pipeline.steps import restore_run_dir


def _retention(branch: dict[str, Any]) -> float | None:
    return branch["metrics"].get("retention", {}).get("overall")


def choose_candidate(branches: list[dict[str, Any]], threshold: float) -> tuple[dict | None, str]:
    """Best LoRAMoE by downstream score among runs keeping >= threshold retention.

    Retention is undefined when the base model knew none of the eval facts; such a run only
    passes a threshold of 0.
    """
    candidates = [b for b in branches if not b.get("error") and b["method"] == "loramoe"]
    if not candidates:
        return None, "no successful LoRAMoE branch"
    keeping = [b for b in candidates if threshold == 0
               or (_retention(b) is not None and _retention(b) >= threshold)]
    if not keeping:
        best = max(candidates, key=lambda b: _retention(b) or 0)
        return None, (f"no LoRAMoE branch keeps retention >= {threshold} (best "
                      f"{best['name']}: {_fmt_opt(_retention(best))})")
    best = max(keeping, key=lambda b: b["metrics"]["downstream_score"])
    return best, (f"{best['name']}: downstream {best['metrics']['downstream_score']:.4f}, "
                  f"retention {_fmt_opt(_retention(best))} (threshold {threshold})")


def _fmt_opt(value: float | None) -> str:
    return "undefined (base knew none of the facts)" if value is None else f"{value:.3f}"


def register_champion(config: PipelineConfig, branches: list[dict[str, Any]],
                      parent_run_id: str, workdir: Path) -> dict[str, Any]:
    """Log every adapter as a pyfunc model; register the best LoRAMoE and give it the alias
    `champion` only if it beats the current champion's downstream score."""
    from loramoe.serving.pyfunc import log_answer_model
    from loramoe.tracking import alias_tags, log_metrics, register_version, set_alias, set_tag

    logged = {}
    for b in branches:
        if b.get("error") or not b.get("mlflow_run_id"):
            continue
        run_dir = restore_run_dir(b["trained"], workdir / b["name"] / "run")
        logged[b["name"]] = log_answer_model(b["mlflow_run_id"], run_dir,
                                             workdir / b["name"] / "staged",
                                             batch_size=config.eval_batch_size)
    best, reason = choose_candidate(branches, config.retention_threshold)
    decision: dict[str, Any] = {"candidate": best["name"] if best else None, "reason": reason,
                                "promoted": False, "logged_models": logged}
    if best is not None:
        score = best["metrics"]["downstream_score"]
        champion = alias_tags(config.registered_model, "champion")
        current = float(champion["downstream_score"]) if champion and \
            "downstream_score" in champion else None
        version = register_version(logged[best["name"]], config.registered_model,
                                   {"downstream_score": str(score)})
        decision["version"] = version
        if current is None or score > current:
            set_alias(config.registered_model, "champion", version)
            decision["promoted"] = True
            decision["reason"] += (" — first champion" if current is None else
                                   f" — beats current champion ({current:.4f})")
        else:
            decision["reason"] += f" — does not beat current champion ({current:.4f})"
    set_tag(parent_run_id, "champion_decision", decision["reason"])
    log_metrics(parent_run_id, {"champion_promoted": float(decision["promoted"])})
    return decision
