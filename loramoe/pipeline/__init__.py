"""The experiment pipeline, by job: config, steps, report (table and plots), registry."""

from loramoe.pipeline.config import PipelineConfig, PipelineConfigError, deep_merge
from loramoe.pipeline.registry import choose_candidate, register_champion
from loramoe.pipeline.report import compare_branches, comparison_plots, results_table
from loramoe.pipeline.steps import (
    DataValidationError,
    branch_outcome,
    evaluate_base_model,
    evaluate_branch,
    ingest,
    restore_run_dir,
    run_branch_training,
    validate_data,
)
from loramoe.pipeline.threads import use_branch_threads

__all__ = [
    "DataValidationError", "PipelineConfig", "PipelineConfigError", "branch_outcome",
    "choose_candidate", "compare_branches", "comparison_plots", "deep_merge",
    "evaluate_base_model", "evaluate_branch", "ingest", "register_champion",
    "restore_run_dir", "results_table", "run_branch_training", "use_branch_threads",
    "validate_data",
]
