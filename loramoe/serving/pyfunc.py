"""An MLflow pyfunc model that loads the base model + a trained adapter and answers prompts.

The logged model holds only the adapter (or, for full SFT, the model folder) and the train
config; the base model is loaded by name at serving time (the embedded default needs no
network). Input: a list of prompt strings (MLflow checks it against predict's type hints); param
`max_new_tokens` (1..512, default 64); a control token's text in a prompt (e.g. '<|im_end|>')
is read as characters, inside the user's message.
Bad requests raise MlflowException
(INVALID_PARAMETER_VALUE), which `mlflow models serve` answers with HTTP 400.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

DEFAULT_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS_CAP = 512  # per request; more is an error, not a silent cut
MAX_PROMPTS = 64  # prompts per request
MAX_PROMPT_TOKENS = 2048  # prompts are never cut from the left without a word
DEFAULT_BATCH_SIZE = 8  # prompts generated together; the pipeline passes eval_batch_size


class ServingInputError(ValueError):
    """A request breaks the model's contract; the server answers it with HTTP 400."""


def _bad_request(message: str) -> Exception:
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    except ImportError:  # used without MLflow: a plain ValueError
        return ServingInputError(message)
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def prompts_from(model_input: Any) -> list[str]:
    """The request's prompts, each a non-empty string, or a 400-style error."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            values = model_input["prompt"].tolist()
        elif model_input.shape[1] == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise _bad_request(f"input has columns {list(model_input.columns)}: send a list of "
                               f"prompt strings, or one column named 'prompt'")
    elif isinstance(model_input, str):
        values = [model_input]  # one prompt, not one per character
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise _bad_request(f"input must be a list of prompt strings, got "
                           f"{type(model_input).__name__}")
    bad = [i for i, v in enumerate(values) if not (isinstance(v, str) and v.strip())]
    if bad:
        raise _bad_request(f"prompt(s) at index {bad[:10]} are not non-empty strings "
                           f"(got {values[bad[0]]!r})")
    if not values or len(values) > MAX_PROMPTS:
        raise _bad_request(f"send 1..{MAX_PROMPTS} prompts per request, got {len(values)}")
    return values


def max_new_tokens_from(params: dict[str, Any] | None, default: int) -> int:
    value = (params or {}).get("max_new_tokens", default)
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_NEW_TOKENS_CAP:
        raise _bad_request(f"params.max_new_tokens must be an integer in "
                           f"1..{MAX_NEW_TOKENS_CAP}, got {value!r}")
    return value


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids as one user message in the chat template, a control token's text in
    it read as characters (e.g. '<|im_end|>': read as the token, a prompt could close its
    user turn and write the assistant's or a system turn itself); a 400-style error for a
    prompt over MAX_PROMPT_TOKENS, or one that cannot be encoded so."""
    from loramoe.data.collate import control_token_rows, literal_prompt_ids

    encoded = [literal_prompt_ids(tokenizer, p) for p in prompts]
    if unmarked := [i for i, ids in enumerate(encoded) if ids is None]:
        token = next(iter(control_token_rows(tokenizer, [prompts[unmarked[0]]])))
        raise _bad_request(f"prompt(s) at index {unmarked[:10]} hold the text {token!r}, "
                           f"which this model's tokenizer reads as a control token and its "
                           f"chat template leaves no way to read as text; send it without")
    if too_long := [i for i, ids in enumerate(encoded) if len(ids) > MAX_PROMPT_TOKENS]:
        raise _bad_request(f"prompt(s) at index {too_long[:10]} have "
                           f"{len(encoded[too_long[0]])} tokens; the limit is "
                           f"{MAX_PROMPT_TOKENS}")
    return encoded


class AnswerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        run_dir = Path(context.artifacts["run"])
        from loramoe.cores import cap_threads_to_cores
        from loramoe.evaluate import load_for_eval
        from loramoe.precision import default_device, native_or_auto
        from loramoe.train.config import read_run_config

        cap_threads_to_cores()  # a serving container's CPU quota, which torch ignores
        # a run trained in bf16 on GPUs may be served on a CPU host without bf16
        dtype = native_or_auto(read_run_config(run_dir).get("dtype", "auto"),
                               default_device(), f"serving {run_dir}")
        self.model, self.tokenizer, self.config = load_for_eval(run=run_dir, dtype=dtype)
        settings = json.loads((run_dir / "serving.json").read_text())
        self.max_new_tokens = int(settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.batch_size = int(settings.get("batch_size", DEFAULT_BATCH_SIZE))

    # The type hints make MLflow check each request (a list of strings) before predict runs.
    def predict(self, context, model_input: list[str],
                params: dict[str, Any] | None = None) -> list[str]:
        import pandas as pd

        from loramoe.evaluate import generate_predictions

        prompts = prompts_from(model_input)
        max_new = max_new_tokens_from(params, self.max_new_tokens)
        encoded = dict(zip(prompts, encode_prompts(self.tokenizer, prompts), strict=True))
        frame = pd.DataFrame({"prompt": prompts, "metric": ["contains"] * len(prompts)})
        return generate_predictions(self.model, self.tokenizer, frame,
                                    batch_size=self.batch_size,
                                    max_prompt_tokens=MAX_PROMPT_TOKENS,
                                    max_new_tokens=max_new,
                                    encode=lambda _, prompt: encoded[prompt])


def stage_run_for_serving(run_dir: str | Path, staging: str | Path,
                          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> Path:
    """A folder with just what serving needs: train config + adapter (or SFT model)."""
    import shutil

    from loramoe.train.config import RUN_CONFIG, check_run_weights, read_run_config, run_part

    run_dir, staging = Path(run_dir), Path(staging)
    config = read_run_config(run_dir)
    check_run_weights(run_dir, config)  # a broken run is not logged, nor staging emptied
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copy(run_dir / RUN_CONFIG, staging / RUN_CONFIG)
    part = run_part(config["method"])
    # MLflow copies the staged folder into its store: linking the weights (a full-SFT model is
    # ~540 MB for the default) spares a third copy on disk; across filesystems, a copy
    shutil.copytree(run_dir / part, staging / part, copy_function=link_or_copy)
    (staging / "serving.json").write_text(json.dumps({"max_new_tokens": max_new_tokens,
                                                       "batch_size": batch_size}))
    return staging


def link_or_copy(source: str, target: str) -> str:
    """A hard link of `source` at `target`, or a copy where the filesystem cannot link."""
    import os
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def log_answer_model(run_id: str, run_dir: str | Path, staging: str | Path,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> str:
    """Log the run's adapter as a pyfunc model on MLflow run `run_id`; returns its URI.
    batch_size: prompts generated together per request (size it to the serving device)."""
    from loramoe.tracking import log_code_model

    staged = stage_run_for_serving(run_dir, staging, batch_size=batch_size)
    package = Path(__file__).resolve().parents[1]  # the loramoe package travels with the model
    # The signature comes from predict's type hints (so MLflow checks every request is a
    # list of strings) plus the example's params (typed, with defaults).
    return log_code_model(
        run_id, package / "serving" / "entry.py", artifacts={"run": str(staged)},
        code_paths=[str(package)],
        input_example=(["What is the capital of Peru?"],
                       {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}),
        requirements=serving_requirements())


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
