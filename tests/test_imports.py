"""Packages export their public names lazily: steps and CLIs that only read configs and
tables start without importing torch or transformers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

LIGHT = ["loramoe", "loramoe.config", "loramoe.data", "loramoe.tracking",
         "loramoe.train.config", "loramoe.pipeline.config", "loramoe.pipeline.steps",
         "loramoe.pipeline.report", "loramoe.pipeline.plots", "loramoe.pipeline.registry",
         "loramoe.pipeline.claims", "loramoe.evaluate.stats"]


def python_prints(code: str, timeout: int = 120) -> str:
    """The last line `code` prints in a fresh interpreter, which must exit 0."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_config_and_report_modules_import_without_torch_or_transformers():
    code = ("import importlib, sys\n"
            f"for name in {LIGHT!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))")
    assert python_prints(code) == "[]"


def test_public_names_resolve_on_first_use():
    import loramoe
    import loramoe.pipeline as pipeline
    from loramoe import LoRAMoEConfig, apply_loramoe
    from loramoe.config import LoRAMoEConfig as direct
    from loramoe.injection import apply_loramoe as direct_apply

    assert LoRAMoEConfig is direct and apply_loramoe is direct_apply
    assert "localized_balancing_loss" in dir(loramoe) and "ingest" in pipeline.__all__
    for package in (loramoe, pipeline):
        for name in package.__all__:
            assert getattr(package, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        loramoe.nope  # noqa: B018


def run_cli(package: str, args: list[str]) -> tuple[list[str], str]:
    """(exit code and whether torch was imported, stderr) of `python -m package` in a fresh
    process."""
    code = ("import sys\n"
            f"from {package}.__main__ import main\n"
            f"code = main({args!r})\n"
            "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    return done.stdout.split(), done.stderr


def test_a_bad_train_config_is_rejected_before_torch_is_imported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny-random-llama"\ntrain_file = "x.jsonl"\noutput_dir = "o"\n'
                   "batch_size = true\n")
    result, stderr = run_cli("loramoe.train", ["--config", str(bad)])
    assert result == ["2", "False"], stderr[-3000:]
    assert "TrainConfig.batch_size: must be an integer" in stderr


def test_a_bad_eval_file_or_run_dir_is_rejected_before_torch_is_imported(tmp_path):
    row = ('{"id": "q1", "task": "t", "task_type": "knowledge", "prompt": "Q?", '
           '"answers": ["a"], "metric": "%s"}\n')
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text(row % "no_such_metric")
    good.write_text(row % "exact_match")
    out = ["--out", str(tmp_path / "o")]
    result, stderr = run_cli("loramoe.evaluate", ["--eval-file", str(bad), *out, "--model", "m"])
    assert result == ["2", "False"] and "column 'metric'" in stderr, stderr[-3000:]
    result, stderr = run_cli("loramoe.evaluate",
                             ["--eval-file", str(good), *out, "--run", str(tmp_path)])
    assert result == ["2", "False"] and "no train_config.json" in stderr, stderr[-3000:]
    assert not (tmp_path / "o").exists()  # nothing written for a rejected request


def test_an_out_folder_holding_an_evaluation_is_refused_before_torch_is_imported(tmp_path):
    """An earlier evaluation is not replaced unless asked (--overwrite), and the base's
    evaluation never is (--out the --base folder), each named before anything loads."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "q1", "task": "t", "task_type": "knowledge", "prompt": "Q?", '
                    '"answers": ["a"], "metric": "exact_match"}\n')
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"knowledge_score": 0.5}')
    (earlier / "predictions.jsonl").write_text("{}\n")
    args = ["--eval-file", str(good), "--model", "m"]
    result, stderr = run_cli("loramoe.evaluate", [*args, "--out", str(earlier)])
    assert result == ["2", "False"], stderr[-3000:]
    assert f"--out {earlier} already holds an evaluation (predictions.jsonl, metrics.json)" \
        in stderr and "--overwrite" in stderr
    result, stderr = run_cli("loramoe.evaluate", [*args, "--out", str(earlier / "."),
                                                  "--base", str(earlier), "--overwrite"])
    assert result == ["2", "False"], stderr[-3000:]
    assert "--out is the --base folder" in stderr
    result, stderr = run_cli("loramoe.evaluate", [*args, "--out", str(good)])
    assert result == ["2", "False"] and f"--out: {good} is a file" in stderr, stderr[-3000:]
    # a folder under a file: NotADirectoryError's traceback before
    result, stderr = run_cli("loramoe.evaluate", [*args, "--out", str(good / "sub")])
    assert result == ["2", "False"], stderr[-3000:]
    assert f"--out: {good / 'sub'} cannot be made: {good} is a file" in stderr, stderr[-3000:]
    assert (earlier / "metrics.json").read_text() == '{"knowledge_score": 0.5}'


def test_one_process_training_imports_no_deepspeed(tiny_model_dir, tiny_train_file, tmp_path):
    """accelerate's unwrap_model imports DeepSpeed (2-6 s) to ask whether the model is its
    engine; a one-process run has no wrapper to take off (before: every adapter branch on a
    CPU paid it, and its log held DeepSpeed's 'Setting accelerator to CPU' warning)."""
    code = ("import sys\n"
            "from loramoe.train import TrainConfig, train\n"
            f"train(TrainConfig(model={str(tiny_model_dir)!r}, train_file="
            f"{str(tiny_train_file)!r}, output_dir={str(tmp_path / 'run')!r}, max_steps=1, "
            "batch_size=4), progress=False)\n"
            "print('deepspeed' in sys.modules)")
    assert python_prints(code, timeout=300) == "False"
    assert (tmp_path / "run" / "adapter").is_dir()


def no_accelerator() -> bool:
    import torch

    return torch.accelerator.current_accelerator(check_available=True) is None


deepspeed_on_a_cpu = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not no_accelerator(),
    reason="DeepSpeed (the dev extra installs it) warns only without an accelerator")


def assert_no_deepspeed_warning(code: str, **environment: str) -> None:
    """`code`, which saves a transformers model, run in a fresh interpreter without a
    DS_ACCELERATOR of its own, prints no DeepSpeed accelerator warning and leaves none set."""
    environment = {**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"},
                   **environment}
    code += "\nimport os\nprint(os.environ.get('DS_ACCELERATOR'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Setting accelerator" not in done.stdout + done.stderr, done.stdout[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "None"  # set for DeepSpeed's import only


@deepspeed_on_a_cpu
def test_full_sft_saved_on_a_cpu_prints_no_deepspeed_warning(tiny_model_dir, tiny_train_file,
                                                              tmp_path):
    """transformers' save_pretrained imports DeepSpeed (through accelerate's unwrap), which on
    a machine without an accelerator warned "Setting accelerator to CPU. If you have GPU ...":
    in every full-SFT branch's log of the default run, before."""
    assert_no_deepspeed_warning(
        "from loramoe.train import TrainConfig, train\n"
        f"train(TrainConfig(model={str(tiny_model_dir)!r}, method='sft', train_file="
        f"{str(tiny_train_file)!r}, output_dir={str(tmp_path / 'run')!r}, max_steps=1, "
        "batch_size=4), progress=False)")
    assert (tmp_path / "run" / "model" / "config.json").is_file()


# A CUDA build of torch names CUDA as its accelerator on a host with no GPU unless asked to
# check (the GPU machine's torch 2.11, rehearsed on a CPU); DeepSpeed checks, finds none and
# warned (before: save_model asked without checking). The CPU build is made to answer so.
AS_A_CUDA_BUILD_WITHOUT_A_GPU = (
    "import torch\n"
    "unchecked = torch.accelerator.current_accelerator\n"
    "torch.accelerator.current_accelerator = lambda check_available=False: (\n"
    "    unchecked(check_available=True) if check_available else torch.device('cuda'))\n")


@deepspeed_on_a_cpu
@pytest.mark.parametrize("torch_build", ["cpu", "cuda without a gpu"])
def test_the_tiny_model_built_on_a_cpu_prints_no_deepspeed_warning(tmp_path, torch_build):
    """The smoke flow's `tiny-random-llama` is built and saved once per cache: the same
    save_pretrained, the same warning (before: on the first smoke run of a machine)."""
    prefix = AS_A_CUDA_BUILD_WITHOUT_A_GPU if torch_build != "cpu" else ""
    assert_no_deepspeed_warning(  # an empty cache: the model is built
        prefix + "from loramoe.model import resolve_model_path\n"
        "resolve_model_path('tiny-random-llama')", LORAMOE_CACHE_DIR=str(tmp_path))
    assert any(tmp_path.glob("tiny-random-llama-*/config.json"))
