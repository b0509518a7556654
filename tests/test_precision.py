"""Precision as a config field: auto-detection, clear errors, what is stored in which dtype."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import config_for

from loramoe import precision
from loramoe.precision import PrecisionError, resolve_dtype
from loramoe.train import TrainConfig, TrainConfigError, train

CPU = torch.device("cpu")


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})


@pytest.fixture
def built(monkeypatch) -> dict:
    """{"model": the model `train` built}, filled in when a test trains."""
    import loramoe.train.builders as builders

    built = {}
    real = builders.build_model

    def recording(config, dtype):
        built["model"], tokenizer = real(config, dtype)
        return built["model"], tokenizer

    monkeypatch.setattr(builders, "build_model", recording)
    return built


def test_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.0)
    for flags, want in [({"avx512_bf16"}, torch.bfloat16), ({"amx_bf16", "amx_tile"},
                        torch.bfloat16), ({"avx2", "avx512f"}, torch.float32), (set(),
                        torch.float32)]:
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: flags)
        assert resolve_dtype("auto", CPU) == want, flags
        assert resolve_dtype("fp32", CPU) == torch.float32


def test_auto_stays_fp32_where_bf16_is_native_but_slower(cpu_with_bf16, monkeypatch):
    # a Xeon VM that reports avx512_bf16 but hides AMX multiplies bf16 at ~0.56x fp32
    for speedup, want in [(0.56, torch.float32), (1.1, torch.float32), (1.5, torch.bfloat16)]:
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda speedup=speedup: speedup)
        assert resolve_dtype("auto", CPU) == want, speedup
    assert resolve_dtype("bf16", CPU) == torch.bfloat16  # asked for: native, so allowed


def test_the_bf16_speedup_is_measured_once_and_cached_per_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMOE_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "measure_bf16_speedup",
                        lambda: calls.append(1) or 0.75)
    precision.cpu_bf16_speedup.cache_clear()
    try:
        assert precision.cpu_bf16_speedup() == 0.75
        precision.cpu_bf16_speedup.cache_clear()  # a new process reads the file
        assert precision.cpu_bf16_speedup() == 0.75 and len(calls) == 1
        stored = json.loads((tmp_path / "cpu_bf16_speedup.json").read_text())
        assert list(stored.values()) == [0.75] and precision.cpu_model_name() in next(
            iter(stored))
    finally:
        precision.cpu_bf16_speedup.cache_clear()


def test_a_cap_on_onednns_instruction_set_is_measured_again(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 took an AMX Xeon's bf16 matmul from 7.5x fp32 to
    0.54x: a speed-up measured without the cap must not pick bf16 under it (the cache was
    keyed on the CPU's name alone)."""
    monkeypatch.setenv("LORAMOE_CACHE_DIR", str(tmp_path))
    for cap in precision.KERNEL_CAPS:
        monkeypatch.delenv(cap, raising=False)
    speedups = iter([7.5, 0.54])
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: next(speedups))
    precision.cpu_bf16_speedup.cache_clear()
    try:
        assert precision.cpu_bf16_speedup() == 7.5
        uncapped = precision.cpu_kernels()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        precision.cpu_bf16_speedup.cache_clear()  # a new process, started with the cap
        assert precision.cpu_bf16_speedup() == 0.54
        assert precision.cpu_kernels() == uncapped[:-1] + "; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)"
    finally:
        precision.cpu_bf16_speedup.cache_clear()


def test_auto_is_fp32_where_onednn_may_not_use_bf16_instructions(tmp_path):
    """The rule on this machine's real kernels: with oneDNN capped below its bf16
    instructions, a bf16 matmul is slow (0.19x fp32 on an AMX Xeon) and `auto` stays fp32.
    A CPU without bf16 flags is fp32 by its flags alone."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "LORAMOE_CACHE_DIR": str(tmp_path),
           "CUDA_VISIBLE_DEVICES": ""}
    code = ("import torch; from loramoe.precision import resolve_dtype; "
            "print(resolve_dtype('auto', torch.device('cpu')))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "torch.float32"


def test_the_bf16_measurement_is_a_positive_ratio():
    assert precision.measure_bf16_speedup(rows=64, repeats=2) > 0


def test_bf16_where_it_is_not_native_names_the_field_and_what_is(cpu_without_bf16):
    with pytest.raises(PrecisionError, match=r"TrainConfig\.dtype: 'bf16' is not computed "
                                             r"natively on this CPU.*supports \['fp32'\]"):
        resolve_dtype("bf16", CPU)
    with pytest.raises(PrecisionError, match=r"'fp16' is not computed natively on a CPU \(fp16 "
                                             r"is for CUDA GPUs\)"):
        resolve_dtype("fp16", CPU)


def test_fp16_on_a_cpu_with_bf16_is_not_blamed_on_missing_bf16_flags(monkeypatch):
    # The message said "this CPU (no avx512_bf16/amx_bf16 flag)" for fp16 on an AMX CPU too.
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    with pytest.raises(PrecisionError) as err:
        resolve_dtype("fp16", CPU)
    assert "fp16 is for CUDA GPUs" in str(err.value)
    assert "avx512_bf16" not in str(err.value) and "supports ['bf16', 'fp32']" in str(err.value)


def test_the_flags_are_read_from_this_machine():
    flags = precision.cpu_flags()
    assert isinstance(flags, set)
    assert precision.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_dtype_field_rejects_unknown_names():
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.dtype: must be one of 'auto'"):
        TrainConfig(dtype="float16")


def test_unsupported_dtype_fails_before_data_or_model_is_loaded(
        cpu_without_bf16, tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    import loramoe.train.builders as builders

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the dtype was checked")

    monkeypatch.setattr(builders, "build_model", no_model)
    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, dtype="bf16")
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.dtype: 'bf16'.*supports"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "loramoe"])
def test_bf16_adapter_training_stores_the_base_in_bf16_and_adapters_in_fp32(
        method, cpu_with_bf16, built, tiny_model_dir, tiny_train_file, tmp_path):
    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, method=method,
                        dtype="bf16", max_steps=4, lr=2e-2)
    train(config, progress=False)
    params = dict(built["model"].named_parameters())
    trainable = {n: p.dtype for n, p in params.items() if p.requires_grad}
    frozen = {n: p.dtype for n, p in params.items() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert set(frozen.values()) == {torch.bfloat16}, set(frozen.values())
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["dtype"] == "bf16"


@pytest.mark.parametrize("method", ["sft", "lora", "loramoe"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bf16_training_on_a_cpu_computes_attention_in_fp32(
        method, dtype, cpu_with_bf16, built, tiny_model_dir, tiny_train_file, tmp_path):
    # torch's CPU flash-attention backward is slow in bf16 (loramoe/backends/attention.py)
    from loramoe.backends.attention import NAME

    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, method=method,
                        dtype=dtype, max_steps=1)
    train(config, progress=False)
    model = built["model"]
    inner = model.get_base_model() if method == "lora" else model
    assert inner.config._attn_implementation == (NAME if dtype == "bf16" else "sdpa")


def test_bf16_sft_keeps_fp32_master_weights_and_learns(cpu_with_bf16, tiny_model_dir,
                                                         tiny_train_file, tmp_path):
    from safetensors.torch import load_file

    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, method="sft",
                        dtype="bf16", max_steps=12, lr=2e-3, batch_size=16)
    result = train(config, progress=False)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"]
    weights = load_file(result.artifact / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the master copy


def test_eval_loads_the_run_in_its_dtype_on_the_device(cpu_with_bf16, tiny_model_dir,
                                                        tiny_train_file, tmp_path):
    from loramoe.evaluate import load_for_eval
    from loramoe.layer import LoRAMoELinear

    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, dtype="bf16", max_steps=2)
    result = train(config, progress=False)
    model, _, saved = load_for_eval(run=result.output_dir, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, LoRAMoELinear)]
    assert layers and all(m.base_layer.weight.dtype == torch.bfloat16 for m in layers)
    assert all(m.lora_A.dtype == torch.float32 for m in layers)
    assert model.device.type == "cpu" and saved["dtype"] == "bf16"
    fp32, _, _ = load_for_eval(run=result.output_dir, dtype="fp32", device="cpu")
    assert next(fp32.parameters()).dtype == torch.float32


def test_a_step_given_fewer_gpus_than_asked_for_says_so():
    from pathlib import Path

    import tomllib

    from loramoe.pipeline import PipelineConfig
    from loramoe.pipeline.threads import GpuRequestError, check_gpus

    smoke = Path(__file__).resolve().parents[1] / "flows" / "configs" / "smoke.toml"
    data = tomllib.loads(smoke.read_text())
    data["resources"]["gpu"] = torch.cuda.device_count() + 1
    config = PipelineConfig.from_dict(data, base_dir=smoke.parent)
    with pytest.raises(GpuRequestError, match=r"config\.resources\.gpu = \d+, but this step "
                                              r"sees \d+ GPU"):
        check_gpus(config)
    # the evaluation steps too, before anything is loaded or written: they used to score the
    # base and the branches on the CPU of a worker scheduled without its GPUs
    from loramoe.pipeline.steps import evaluate_base_model, evaluate_branch

    data["resources"]["eval_gpu"] = torch.cuda.device_count() + 1
    config = PipelineConfig.from_dict(data, base_dir=smoke.parent)
    with pytest.raises(GpuRequestError, match=r"config\.resources\.eval_gpu = \d+, but"):
        evaluate_base_model(config, None, Path("/nonexistent"))
    with pytest.raises(GpuRequestError, match=r"config\.resources\.eval_gpu = \d+, but"):
        evaluate_branch(config, {}, None, None, Path("/nonexistent"), None)
    del data["resources"]["eval_gpu"]
    data["resources"]["gpu"] = 8
    implied = PipelineConfig.from_dict(data, base_dir=smoke.parent)
    assert implied.eval_gpus == 1  # evaluation runs on one GPU of the eight
    if torch.cuda.device_count() == 0:
        with pytest.raises(GpuRequestError, match=r"eval_gpu = 1 \(its default with gpu = 8\)"):
            check_gpus(implied, evaluation=True)
    data["resources"]["gpu"] = 0
    check_gpus(PipelineConfig.from_dict(data, base_dir=smoke.parent))


def test_eval_gpu_is_checked_and_may_be_zero():
    from pathlib import Path

    import tomllib

    from loramoe.pipeline import PipelineConfig, PipelineConfigError

    smoke = Path(__file__).resolve().parents[1] / "flows" / "configs" / "smoke.toml"
    data = tomllib.loads(smoke.read_text())
    for bad in (-1, 0.5, "one"):
        data["resources"] = {"cpu": 1, "memory": 2000, "gpu": 2, "eval_gpu": bad}
        with pytest.raises(PipelineConfigError, match=r"config\.resources.*eval_gpu >= 0"):
            PipelineConfig.from_dict(data, base_dir=smoke.parent)
    data["resources"]["eval_gpu"] = 0  # train on GPUs, score on CPUs: allowed, alike
    assert PipelineConfig.from_dict(data, base_dir=smoke.parent).eval_gpus == 0


def test_a_run_trained_in_bf16_is_served_where_bf16_is_not_native(
        tiny_model_dir, tiny_train_file, tmp_path, monkeypatch, capfd, cpu_without_bf16):
    """A run trained with dtype = "bf16" (the paper config, on GPUs) and served from the
    registry on a CPU host without native bf16: serving loads the frozen weights in what
    the host computes natively and says so (before: PrecisionError in load_context, so the
    registered model could not be served there). Evaluation keeps the run's dtype, for
    comparable scores, and its error says how to choose another."""
    from types import SimpleNamespace

    from loramoe.evaluate import load_for_eval
    from loramoe.serving.pyfunc import AnswerModel, stage_run_for_serving

    run = tmp_path / "run"  # where config_for puts it
    train(config_for(tiny_model_dir, tiny_train_file, tmp_path, max_steps=1, dtype="fp32"),
          progress=False)
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**saved, "dtype": "bf16"}))
    staged = stage_run_for_serving(run, tmp_path / "staged")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU serving host
    served = AnswerModel()
    served.load_context(SimpleNamespace(artifacts={"run": str(staged)}))
    assert served.model.dtype == torch.float32
    assert "its train dtype 'bf16' is not computed natively" in capfd.readouterr().err
    assert len(served.predict(None, ["What is 2+2?"], {"max_new_tokens": 2})) == 1
    with pytest.raises(PrecisionError, match=r"the run's dtype .*train_config\.json.*'bf16' "
                                             r"is not computed natively"):
        load_for_eval(run=run)


def test_a_resume_in_another_dtype_says_so(tiny_model_dir, tiny_train_file, tmp_path, capfd):
    """dtype = "auto" resolves per machine: a checkpoint written with bf16 frozen weights
    (an AMX CPU, a GPU) resumed where auto is fp32 continues, and says from which step its
    numbers round otherwise (before: silently)."""
    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, max_steps=2, save_every=1,
                        dtype="fp32")
    train(config, progress=False)
    progress = tmp_path / "run" / "checkpoints" / "step_2" / "progress.json"
    assert json.loads(progress.read_text())["dtype"] == "fp32"
    progress.write_text(json.dumps({**json.loads(progress.read_text()), "dtype": "bf16"}))
    capfd.readouterr()
    config.max_steps = 3
    train(config, resume=True, progress=False)
    assert ("the checkpoint's frozen weights were bf16, here they are fp32 (dtype 'fp32' on "
            "this machine): the steps from 2 on round otherwise") in capfd.readouterr().err
