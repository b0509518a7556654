"""The experiment pipeline, by job: config, steps, report (table and plots), registry."""

from loramoe.pipeline.config import PipelineConfig, PipelineConfigError, deep_merge
from loramoe.pipeline.registry import choose_candidate, register_champion
from loramoe.pipeline.report import comparison_plots, results_table
from loramoe.pipeline.slots import branch_slot, cpu_slot
from loramoe.pipeline.steps import (
    DataValidationError,
    evaluate_base_model,
    evaluate_branch,
    ingest,
    restore_run_dir,
    run_branch_training,
    validate_data,
)

__all__ = [
    "DataValidationError", "PipelineConfig", "PipelineConfigError", "branch_slot",
    "choose_candidate", "comparison_plots", "cpu_slot", "deep_merge", "evaluate_base_model",
    "evaluate_branch", "ingest", "register_champion", "restore_run_dir", "results_table",
    "run_branch_training", "validate_data",
]
