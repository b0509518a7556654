"""MLflow tracking: the only part of loramoe that calls MLflow (runs, models, registry)."""

from loramoe.tracking.models import (
    alias_version,
    log_code_model,
    register_version,
    set_alias,
    set_version_tag,
)
from loramoe.tracking.runs import (
    DEFAULT_DB,
    MlflowSink,
    TrackingError,
    check_store,
    current_store,
    end_run,
    fetch_folder,
    flatten,
    log_metrics,
    log_params,
    set_tag,
    setup,
    start_child_run,
    start_parent_run,
    store_folder,
    system_metrics,
    tracking_uri,
    use_store,
)

__all__ = [
    "DEFAULT_DB", "MlflowSink", "TrackingError", "alias_version", "check_store", "current_store",
    "end_run",
    "fetch_folder", "flatten", "log_code_model", "log_metrics", "log_params",
    "register_version", "set_alias", "set_tag", "set_version_tag", "setup", "start_child_run",
    "start_parent_run", "store_folder", "system_metrics", "tracking_uri", "use_store",
]
