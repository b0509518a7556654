"""The tracking module against a real MLflow sqlite store."""

from __future__ import annotations


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
