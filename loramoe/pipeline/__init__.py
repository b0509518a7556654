"""The experiment pipeline, by job: config, steps, report (table and plots), registry."""

from __future__ import annotations

from loramoe.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "loramoe.pipeline.config": ["PipelineConfig", "PipelineConfigError", "branch_name",
                                "deep_merge"],
    "loramoe.pipeline.registry": ["choose_candidate", "register_champion"],
    "loramoe.pipeline.plots": ["comparison_plots"],
    "loramoe.pipeline.report": ["NothingTrained", "check_some_trained", "compare_branches",
                                "results_table"],
    "loramoe.pipeline.steps": ["DataValidationError", "branch_outcome", "evaluate_base_model",
                               "evaluate_branch", "ingest", "restore_run_dir",
                               "run_branch_training", "validate_data"],
    "loramoe.pipeline.threads": ["use_branch_threads"],
})
