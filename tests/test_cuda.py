"""On a CUDA GPU: the layer in bf16 against the fp64 formula, generation with the KV cache
through the plugin, and one training step of each method on the device. Skipped, with the
reason, where no GPU is present (benchmarks/gpu_check.sh runs them on one).

Only torch, transformers, peft, accelerate, safetensors and pandas are used: the GPU machine
has nothing else (no datasets, mlflow, metaflow, great-expectations, gguf)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from loramoe import LoRAMoEConfig, apply_loramoe
from loramoe.layer import LoRAMoELinear

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="no CUDA GPU on this machine")]
CUDA = torch.device("cuda")


def test_layer_in_bf16_on_the_gpu_matches_the_fp64_formula():
    torch.manual_seed(0)
    layer64 = LoRAMoELinear(nn.Linear(256, 384), LoRAMoEConfig(dropout=0.0)).double()
    with torch.no_grad():
        for param in layer64.expert_weights():
            param.normal_(std=0.05)
        layer64.base_layer.weight.copy_(layer64.base_layer.weight.bfloat16())
        layer64.base_layer.bias.copy_(layer64.base_layer.bias.bfloat16())
    layer = copy.deepcopy(layer64).float().to(CUDA)
    layer.base_layer.to(torch.bfloat16)
    layer.backend = None  # the fused backend is CPU-only: the GPU runs the formula
    x = torch.randn(2, 64, 256, dtype=torch.float64).bfloat16().double()
    x_gpu = x.to(CUDA, torch.bfloat16).requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    out, ref = layer(x_gpu), layer64(x_ref)
    assert out.dtype == torch.bfloat16 and layer.router_probs.dtype == torch.float32
    error = (out.double().cpu() - ref).abs().max() / ref.abs().max()
    assert error < 2e-2, error
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x_gpu, *layer.expert_weights()], g.to(CUDA, out.dtype))
    want = torch.autograd.grad(ref, [x_ref, *layer64.expert_weights()], g)
    for name, a, b in zip(["x", "router", "A", "B"], got, want, strict=True):
        rel = (a.double().cpu() - b).abs().max() / b.abs().max()
        assert rel < 3e-2, f"grad of {name}: {rel:.2e}"


def test_generate_with_the_kv_cache_on_the_gpu_gives_the_uncached_tokens(tiny_llama):
    model = apply_loramoe(tiny_llama.to(CUDA, torch.bfloat16), LoRAMoEConfig()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a plugin that changes the outputs
    ids = torch.randint(3, 90, (3, 7), device=CUDA)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert cached.device.type == "cuda" and cached.shape[1] == 19
    assert torch.equal(cached, uncached)


@pytest.fixture(scope="module")
def gpu_train_file(tmp_path_factory):
    """Written here (not by loramoe.data, whose tasks need packages the GPU box lacks)."""
    path = tmp_path_factory.mktemp("gpu") / "train.jsonl"
    rows = [{"id": f"r{i}", "task": "add", "task_type": ["knowledge", "downstream"][i % 2],
             "prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", ["sft", "lora", "loramoe"])
def test_one_train_step_of_each_method_runs_on_the_gpu(method, tiny_model_dir, gpu_train_file,
                                                       tmp_path):
    from loramoe.evaluate import load_for_eval
    from loramoe.train import TrainConfig, train

    config = TrainConfig(method=method, model=str(tiny_model_dir),
                         train_file=str(gpu_train_file), output_dir=str(tmp_path / "run"),
                         batch_size=8, max_steps=2, max_length=64, dtype="auto")
    result = train(config, progress=False)
    assert result.steps == 2 and result.artifact.is_dir()
    assert torch.isfinite(torch.tensor(result.final_metrics["lm_loss"]))
    model, _, saved = load_for_eval(run=result.output_dir)
    assert model.device.type == "cuda" and saved["dtype"] == "auto"
