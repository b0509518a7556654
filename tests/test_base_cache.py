"""The base model's evaluation is computed once per (model, eval set, settings, code) and
reused across runs; any change to what it depends on recomputes it."""

from __future__ import annotations

import json
import shutil

import pytest

from loramoe.data.records import read_records, write_records
from loramoe.evaluate import cache as base_cache
from loramoe.evaluate import run as evaluate_run
from loramoe.evaluate.cache import cached_base_evaluation


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMOE_CACHE_DIR", str(tmp_path / "cache"))
    base_cache.folder_digest.cache_clear()
    yield tmp_path / "cache" / "base_eval"
    base_cache.folder_digest.cache_clear()


def run_base(model, eval_file, out, settings=None):
    def compute(folder):
        return evaluate_run.evaluate(eval_file, folder, model=model, batch_size=4,
                                     progress=False)

    return cached_base_evaluation(model, eval_file, out, settings or {"batch_size": 4},
                                  compute)


def test_a_second_run_reuses_the_base_evaluation_without_loading_the_model(
        isolated_cache, tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    eval_file = tiny_train_file.parent / "eval.jsonl"
    first = run_base(str(tiny_model_dir), eval_file, tmp_path / "one")
    assert first["cache"]["hit"] is False

    def no_model(*args, **kwargs):
        raise AssertionError("the cached base evaluation loaded the model")

    monkeypatch.setattr(evaluate_run, "load_for_eval", no_model)
    second = run_base(str(tiny_model_dir), eval_file, tmp_path / "two")
    assert second["cache"] == {"hit": True, "key": first["cache"]["key"]}
    for name in ("predictions.jsonl", "probe.jsonl", "metrics.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert {k: v for k, v in second.items() if k != "cache"} == json.loads(
        (tmp_path / "one" / "metrics.json").read_text())


def test_changed_facts_weights_or_settings_recompute(isolated_cache, tiny_model_dir,
                                                    tiny_train_file, tmp_path):
    eval_file = tiny_train_file.parent / "eval.jsonl"
    key = run_base(str(tiny_model_dir), eval_file, tmp_path / "a")["cache"]["key"]
    fewer = write_records(read_records(eval_file).iloc[:-1], tmp_path / "fewer.jsonl")
    assert run_base(str(tiny_model_dir), fewer, tmp_path / "b")["cache"]["hit"] is False
    assert run_base(str(tiny_model_dir), eval_file, tmp_path / "c",
                    {"batch_size": 8})["cache"]["hit"] is False
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    changed = run_base(str(other), eval_file, tmp_path / "d")
    assert changed["cache"]["hit"] is False and changed["cache"]["key"] != key
    assert run_base(str(tiny_model_dir), eval_file, tmp_path / "e")["cache"]["hit"] is True


def test_the_thread_count_and_the_cpu_are_settings(monkeypatch):
    """In bf16 a CPU's thread count changes the order its GEMMs sum in, and so the scores
    (68 of the default mixture's 2,274 items moved between 1 and 2 threads): a base
    evaluation made at one count is not served to a run at another."""
    import torch

    from loramoe import precision
    from loramoe.evaluate.cache import base_eval_key, eval_settings

    monkeypatch.setattr(precision, "cpuinfo_field", lambda name: {
        "model name": "Some CPU", "flags": "sse avx512_bf16 amx_tile amx_bf16"}[name])
    for cap in precision.KERNEL_CAPS:
        monkeypatch.delenv(cap, raising=False)
    aten = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = eval_settings("bfloat16", "cpu", 16, 0)
        torch.set_num_threads(2)
        two = eval_settings("bfloat16", "cpu", 16, 0)
    finally:
        torch.set_num_threads(threads)
    assert one == {"dtype": "bfloat16", "device": "cpu", "batch_size": 16,
                   "generate_per_task": 0, "threads": 1,
                   "cpu": f"Some CPU (amx_bf16 avx512_bf16; ATen {aten})"}
    assert two == {**one, "threads": 2}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # rounds otherwise (§3)
    capped = eval_settings("bfloat16", "cpu", 16, 0)
    assert capped == {**two, "threads": threads,
                      "cpu": f"Some CPU (amx_bf16 avx512_bf16; ATen {aten}; "
                             f"ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)"}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # fp32 products' last bits move
    assert eval_settings("float32", "cpu", 16, 0)["cpu"].endswith(
        f"ATen {aten}; MKL_ENABLE_INSTRUCTIONS=AVX2)")
    monkeypatch.setattr("loramoe.evaluate.cache.model_digest", lambda model: "m")
    monkeypatch.setattr("loramoe.evaluate.cache.code_digest", lambda: "c")
    monkeypatch.setattr("loramoe.evaluate.cache.file_sha256", lambda path: "e")
    assert base_eval_key("x", None, one) != base_eval_key("x", None, two)


def test_a_gpu_is_named_by_the_models_own_index(monkeypatch):
    """On a machine with two kinds of GPU, a model on cuda:1 is scored by GPU 1's rounding,
    not by the current device's (the name used to be asked without an index)."""
    import torch

    from loramoe.evaluate.cache import eval_settings

    names = {0: "GPU zero", 1: "GPU one"}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[
        torch.cuda.current_device() if device is None or torch.device(device).index is None
        else torch.device(device).index])
    assert eval_settings("bfloat16", torch.device("cuda", 1), 64, 0) == {
        "dtype": "bfloat16", "device": "cuda", "batch_size": 64, "generate_per_task": 0,
        "gpu": "GPU one"}
    assert eval_settings("bfloat16", "cuda", 64, 0)["gpu"] == "GPU zero"
