"""The tracking module against a real MLflow sqlite store."""

from __future__ import annotations

import os

import pytest


def test_a_block_shorter_than_the_sampling_interval_still_logs_system_metrics(tmp_path):
    import mlflow

    from loramoe.tracking import system_metrics

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    run_id = mlflow.MlflowClient().create_run(experiment).info.run_id
    with system_metrics(run_id, interval=60.0):  # the block ends long before one interval
        pass
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics


@pytest.fixture(scope="module")
def uri_set_by_a_module_fixture(tmp_path_factory):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('module_store') / 'mlflow.db'}")


def test_a_module_fixture_may_set_the_tracking_uri(uri_set_by_a_module_fixture):
    assert "module_store" in os.environ["MLFLOW_TRACKING_URI"]


def test_later_tests_do_not_inherit_it():
    """A flow run started here would log to that fixture's store (conftest's restore put
    back the fixture's value, not the session's: six pipeline tests failed that way)."""
    from conftest import SESSION_TRACKING_URI

    assert os.environ.get("MLFLOW_TRACKING_URI") == SESSION_TRACKING_URI
