"""A whole flow run of its own (no shared smoke run): with broken data. A file apart from
test_pipeline.py so that pytest-xdist's `--dist loadfile` can run it beside the smoke run's
module instead of after it. (The run against a real MLflow tracking server is the seeds run
of test_pipeline.py: one flow run fewer.)"""

from __future__ import annotations

import json

from test_pipeline import (
    run_flow,
    write_config,
)


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
