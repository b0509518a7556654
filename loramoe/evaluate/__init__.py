"""Evaluation: generation, scoring and retention, routing analysis, and the run that ties
them together (`python -m loramoe.evaluate`)."""

from loramoe.evaluate.generation import MAX_NEW_TOKENS, generate_predictions
from loramoe.evaluate.routing import RouterRecorder, plot_router, router_analysis
from loramoe.evaluate.run import evaluate, load_for_eval
from loramoe.evaluate.scoring import CORRECT, retention, score_predictions, summarize

__all__ = [
    "CORRECT", "MAX_NEW_TOKENS", "RouterRecorder", "evaluate", "generate_predictions",
    "load_for_eval", "plot_router", "retention", "router_analysis", "score_predictions",
    "summarize",
]
