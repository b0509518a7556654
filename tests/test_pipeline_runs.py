"""Whole flow runs of their own (no shared smoke run): against a real MLflow tracking server,
and with broken data. A file apart from test_pipeline.py so that pytest-xdist's
`--dist loadfile` can run them beside the smoke run's module instead of after it."""

from __future__ import annotations

import json
import shutil
import subprocess

from test_pipeline import (
    ROOT,
    branch_tasks,
    free_port,
    peak_concurrency,
    run_flow,
    wait_for,
    write_config,
)


def test_pipeline_against_a_real_tracking_server(tmp_path):
    port = free_port()
    # The server's log goes to a file: an unread PIPE fills (64 KiB of request lines) and
    # blocks the server, and with it every client call of the flow (seen: register hung).
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(["bash", str(ROOT / "infra" / "mlflow" / "start_server.sh"),
                               str(port), str(tmp_path / "server")],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, 90, tmp_path / "server.log")
        uri = f"http://127.0.0.1:{port}"
        config = write_config(tmp_path / "serial.toml", local_parallel_branches=1)
        run, _, stderr = run_flow(tmp_path, config, env={"MLFLOW_TRACKING_URI": uri},
                                  methods="loramoe", scales="16,32")
        assert run.successful, stderr[-3000:]
        assert peak_concurrency(branch_tasks(run)) == 1  # one branch at a time
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)  # not the process-wide default
        runs = client.search_runs([client.get_experiment_by_name("loramoe-smoke").experiment_id])
        assert len(runs) == 3  # parent + loramoe-16 + loramoe-32
        assert client.get_model_version_by_alias("loramoe-smoke", "champion")
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp_path / "server", ignore_errors=True)


def test_broken_data_fails_in_validate_with_readable_message(tmp_path):
    rows = [{"question": f"Who is person {i}?", "answer": "" if i % 3 == 0 else f"Name {i}"}
            for i in range(80)]
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = write_config(tmp_path / "broken.toml")
    text = config.read_text().replace(
        'tasks = [{ name = "country_capital" }',
        f'tasks = [{{ name = "people", source = "local", path = "{data}", '
        f'task_type = "knowledge", columns = {{ prompt = "question", answers = "answer" }} }}, '
        f'{{ name = "country_capital" }}')
    config.write_text(text)
    run, _, stderr = run_flow(tmp_path, config)
    assert not run.successful
    failed = [s.id for s in run if not s.task.successful]
    assert failed == ["validate"]
    log = run["validate"].task.stderr
    assert "data validation failed" in log and "column 'response'" in log
    assert "index.html" in log
