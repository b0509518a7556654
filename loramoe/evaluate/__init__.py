"""Evaluation: generation, scoring and retention, routing analysis, and the run that ties
them together (`python -m loramoe.evaluate`)."""

from __future__ import annotations

from loramoe.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "loramoe.evaluate.generation": ["MAX_NEW_TOKENS", "generate_predictions"],
    "loramoe.evaluate.routing": ["RouterRecorder", "plot_router", "router_analysis"],
    "loramoe.evaluate.run": ["evaluate", "load_for_eval"],
    "loramoe.evaluate.scoring": ["CORRECT", "retention", "score_predictions", "summarize"],
})
