"""MLflow runs: the store, parent/child runs, params, metrics, artifacts, system metrics."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"


def tracking_uri(workdir: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite database in the working folder (MLflow 3's
    file store is deprecated)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(workdir) / DEFAULT_DB).resolve()}"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message names where its URI came from."""


def _origin(uri: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return f"MLFLOW_TRACKING_URI={uri!r}"
    return f"the default tracking store {uri!r} (set MLFLOW_TRACKING_URI to use another)"


def check_store(uri: str) -> None:
    """A local store's folder must exist (or be creatable) and be writable, and a local store
    is refused on remote workers (Kubernetes, Argo, AWS Batch: Metaflow's
    METAFLOW_RUNTIME_ENVIRONMENT), where each step runs on a worker of its own that cannot
    see the file another wrote: the run would fail in a later step, after the work before it."""
    remote = os.environ.get("METAFLOW_RUNTIME_ENVIRONMENT", "local")
    if remote != "local" and uri.startswith(("sqlite:", "file:")):
        raise TrackingError(
            f"{_origin(uri)}: a file on this {remote} worker; the flow's other steps run on "
            f"other workers and cannot see it. Set MLFLOW_TRACKING_URI to an MLflow server "
            f"they all reach (infra/README.md)")
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = Path(uri[len(scheme):])
            folder = path.parent if scheme == "sqlite:///" else path
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise TrackingError(f"{_origin(uri)}: cannot create {folder}: "
                                    f"{err.strerror}") from None
            if not os.access(folder, os.W_OK):
                raise TrackingError(f"{_origin(uri)}: {folder} is not writable")


def setup(experiment: str, workdir: str | Path = ".") -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(workdir)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        made = found.experiment_id if found else mlflow.create_experiment(experiment)
    except Exception as err:  # sqlalchemy, HTTP and MLflow errors alike
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise TrackingError(f"{_origin(uri)}: the tracking store cannot be used: {first}"
                            ) from None
    if found and found.lifecycle_stage == "deleted":  # MLflow refuses runs in it
        raise TrackingError(
            f"{_origin(uri)}: the MLflow experiment {experiment!r} (id {made}) was deleted; "
            f"restore it (mlflow experiments restore --experiment-id {made}) or choose "
            f"another mlflow_experiment in the config")
    return made


def use_store(uri: str) -> None:
    """Point this process at the store (each Metaflow step runs in a process of its own)."""
    import mlflow

    mlflow.set_tracking_uri(uri)


def current_store() -> str:
    """The store this process points at (passed on to the processes a step launches)."""
    import mlflow

    return mlflow.get_tracking_uri()


def start_parent_run(experiment_id: str, name: str, tags: dict[str, str]) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return run.info.run_id


def start_child_run(experiment_id: str, parent_run_id: str, name: str,
                    tags: dict[str, str] | None = None) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=name,
                            tags={"mlflow.parentRunId": parent_run_id, **(tags or {})})
    return run.info.run_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def log_params(run_id: str, params: dict[str, Any]) -> None:
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()
             if isinstance(v, (int, float)) and v is not None]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start:start + 500])


def store_folder(run_id: str, paths: list[Path], artifact_path: str) -> str:
    """Log files and folders under `artifact_path` of the run; returns that path."""
    import mlflow

    client = mlflow.MlflowClient()
    for path in paths:
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=f"{artifact_path}/{path.name}")
        else:
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    return artifact_path


def fetch_folder(run_id: str, artifact_path: str, destination: Path) -> Path:
    """Download a folder (or one file in it) logged with store_folder; returns its local copy."""
    import mlflow

    destination.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(destination)))


def set_tag(run_id: str, key: str, value: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_tag(run_id, key, value[:5000])  # MLflow's tag value limit


def end_run(run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status)


class MlflowSink:
    """The trainer's MetricsSink, logging each step's metrics to one MLflow run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.run_id, {f"train/{k}": v for k, v in metrics.items()}, step)


@contextlib.contextmanager
def system_metrics(run_id: str | None, interval: float = 1.0):
    """CPU/memory (and GPU) usage logged to the run while the block runs, if psutil exists."""
    if run_id is None or importlib.util.find_spec("psutil") is None:
        yield
        return
    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval,
                                   tracking_uri=mlflow.get_tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # The monitor publishes once per interval: a block shorter than that would log
        # nothing, so one closing sample is always published.
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
