"""Progress off a terminal is whole lines: Metaflow's local runtime reads each task's output
with readline(), so a progress bar's carriage-return redraws held it on one task while the
parallel branches filled their pipes and stopped (a 507-step training stalled its two
siblings at ~350 steps in the methods_4096 run)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from loramoe.progress import LineProgress, NoProgress, progress, track


def test_line_progress_writes_at_most_one_line_per_tenth():
    out = io.StringIO()
    bar = LineProgress(507, "train loramoe", file=out)
    for step in range(507):
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines(keepends=True)
    assert 5 <= len(lines) <= 11 and all(line.endswith("\n") for line in lines)
    assert "\r" not in out.getvalue()
    assert lines[0] == "train loramoe: 51/507 (loss=0.020)\n"
    assert lines[-1] == "train loramoe: 507/507 (loss=0.002)\n"


def test_a_resumed_bar_reports_only_what_is_left():
    out = io.StringIO()
    bar = LineProgress(10, "train", initial=9, file=out)
    bar.update(1)
    assert out.getvalue() == "train: 10/10\n"


def test_off_a_terminal_progress_is_lines_and_disabled_is_silent(capsys):
    assert isinstance(progress(3, "x", enabled=False), NoProgress)
    assert list(track(range(3), 3, "generate")) == [0, 1, 2]  # pytest's stderr: no terminal
    assert capsys.readouterr().err.splitlines() == ["generate: 1/3", "generate: 2/3",
                                                    "generate: 3/3"]


def test_train_and_evaluate_clis_write_whole_lines_off_a_terminal(tiny_model_dir,
                                                                   tiny_train_file, tmp_path):
    """Both CLIs with stderr on a pipe, as a Metaflow task has it: no carriage return from
    our bars or from transformers' "Loading weights" bar (failed before: tqdm's \\r)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": str(tiny_model_dir), "method": "loramoe",
                                  "train_file": str(tiny_train_file), "max_steps": 3,
                                  "output_dir": str(tmp_path / "run")}))
    commands = {
        "train": ["-m", "loramoe.train", "--config", str(config)],
        "evaluate": ["-m", "loramoe.evaluate", "--run", str(tmp_path / "run"), "--eval-file",
                     str(tiny_train_file.parent / "eval.jsonl"), "--out", str(tmp_path / "ev")],
    }
    for name, args in commands.items():
        done = subprocess.run([sys.executable, *args], capture_output=True, timeout=600)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert b"\r" not in done.stderr, (name, done.stderr[-500:])
        mark = b"train loramoe: 3/3" if name == "train" else b"generate: "
        assert mark in done.stderr, (name, done.stderr[-500:])


def test_mlflow_artifact_transfers_write_whole_lines_off_a_terminal(tmp_path):
    """A flow's evaluate step downloads the trained folder from its MLflow run: MLflow's own
    "Downloading artifacts" bar wrote carriage returns into the task's output (failed before,
    seen in the README run's log)."""
    script = f"""
import sys
from pathlib import Path
from loramoe.progress import whole_lines_off_terminal
whole_lines_off_terminal()
import mlflow
mlflow.set_tracking_uri("sqlite:///{tmp_path}/mlflow.db")
folder = Path("{tmp_path}") / "trained"
folder.mkdir()
for name in "abc":
    (folder / f"{{name}}.json").write_text("{{}}")
with mlflow.start_run() as run:
    mlflow.log_artifacts(str(folder), "trained")
got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="trained",
                                          dst_path="{tmp_path}/back")
print(sorted(p.name for p in Path(got).iterdir()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip() == "['a.json', 'b.json', 'c.json']"
    assert b"\r" not in done.stderr, done.stderr[-500:]
