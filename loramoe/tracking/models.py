"""MLflow models: log a models-from-code pyfunc, register versions, move the champion alias."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def log_code_model(run_id: str, entry: Path, artifacts: dict[str, str], code_paths: list[str],
                   input_example: Any, requirements: list[str]) -> str:
    """Log `entry` (a file that calls mlflow.models.set_model) as the run's model "model";
    returns its model URI. MLflow runs the input example once here, to infer the signature."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(entry), artifacts=artifacts, code_paths=code_paths,
            input_example=input_example, pip_requirements=requirements)
    return info.model_uri


def register_version(model_uri: str, name: str, tags: dict[str, str]) -> int:
    """Register `model_uri` as a new version of registered model `name`; its version."""
    import mlflow

    version = int(mlflow.register_model(model_uri, name).version)
    for key, value in tags.items():
        set_version_tag(name, version, key, value)
    return version


def alias_version(name: str, alias: str) -> dict[str, Any] | None:
    """The version `alias` points to, as {"version", "run_id", "tags"}; None if there is no
    such model or alias."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:  # no registered model, or no alias yet
        return None
    return {"version": int(found.version), "run_id": found.run_id, "tags": dict(found.tags)}


def set_version_tag(name: str, version: int, key: str, value: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_model_version_tag(name, str(version), key, value)


def set_alias(name: str, alias: str, version: int) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
