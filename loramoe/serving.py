"""An MLflow pyfunc model that loads the base model + a trained adapter and answers prompts.

The logged model holds only the adapter (or, for full SFT, the model folder) and the train
config; the base model is loaded by name at serving time (the embedded default needs no
network). Input: a DataFrame with a "prompt" column, or a list of strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc


class AnswerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        run_dir = Path(context.artifacts["run"])
        from loramoe.evaluate import load_for_eval

        self.model, self.tokenizer, self.config = load_for_eval(run=run_dir)
        self.max_new_tokens = int(json.loads((run_dir / "serving.json").read_text())
                                  .get("max_new_tokens", 64))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        import pandas as pd

        from loramoe.evaluate import generate_predictions

        if isinstance(model_input, pd.DataFrame):
            prompts = model_input["prompt"].astype(str).tolist()
        else:
            prompts = [str(p) for p in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        frame = pd.DataFrame({"prompt": prompts, "metric": ["contains"] * len(prompts)})
        return generate_predictions(self.model, self.tokenizer, frame, batch_size=8,
                                    max_new_tokens=max_new)


def stage_run_for_serving(run_dir: str | Path, staging: str | Path,
                          max_new_tokens: int = 64) -> Path:
    """A folder with just what serving needs: train config + adapter (or SFT model)."""
    import shutil

    run_dir, staging = Path(run_dir), Path(staging)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    config = json.loads((run_dir / "train_config.json").read_text())
    shutil.copy(run_dir / "train_config.json", staging / "train_config.json")
    part = "model" if config["method"] == "sft" else "adapter"
    shutil.copytree(run_dir / part, staging / part)
    (staging / "serving.json").write_text(json.dumps({"max_new_tokens": max_new_tokens}))
    return staging


def log_answer_model(run_id: str, run_dir: str | Path, staging: str | Path):
    """Log the run's adapter as a pyfunc model on MLflow run `run_id`; returns ModelInfo."""
    import mlflow

    staged = stage_run_for_serving(run_dir, staging)
    code = Path(__file__).resolve().parent
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(code / "serving_entry.py"),
            artifacts={"run": str(staged)},
            code_paths=[str(code)],
            pip_requirements=serving_requirements(),
        )


def serving_requirements() -> list[str]:
    """Pinned from this environment: skips MLflow's slow requirement inference."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("torch", "transformers", "peft", "safetensors", "accelerate", "gguf",
                 "pandas", "sacrebleu", "mlflow"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pins
