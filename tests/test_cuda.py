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
    layer.backend = None  # the formula itself (the fused node has a test of its own)
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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_node_on_the_gpu_matches_the_fp64_formula(dropout):
    """The fused backend on the GPU (bf16 base, fp32 adapters, a dense dropout mask drawn
    on the device) against the fp64 formula with the same mask."""
    from loramoe.backends import fused

    torch.manual_seed(0)
    layer64 = LoRAMoELinear(nn.Linear(256, 384), LoRAMoEConfig(dropout=dropout)).double()
    with torch.no_grad():
        for param in layer64.expert_weights():
            param.normal_(std=0.05)
        layer64.base_layer.weight.copy_(layer64.base_layer.weight.bfloat16())
        layer64.base_layer.bias.copy_(layer64.base_layer.bias.bfloat16())
    layer = copy.deepcopy(layer64).float().to(CUDA).train()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(2, 64, 256, dtype=torch.float64).bfloat16().double()
    mask = fused.draw_dropped(x.numel(), dropout, CUDA) if dropout else None
    if mask is not None:  # the reference applies the node's own draw
        assert mask.dtype == torch.bool and abs(mask.float().mean().item() - dropout) < 0.02
        keep = (~mask).cpu().double().view(x.shape) / (1 - dropout)
        layer64.dropout = nn.Identity()
        layer64.train()
    x_gpu = x.to(CUDA, torch.bfloat16).requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    weight_t = layer.base_layer.weight.t()
    out, probs = fused.FusedLoRAMoE.apply(
        x_gpu, *layer.expert_weights(), weight_t, layer.base_layer.bias, None,
        layer.scaling / (1 - dropout), mask)
    if mask is None:
        ref, ref_probs = layer64.formula(x_ref)
    else:  # the formula with the node's mask: base and router on x, experts on dropout(x)
        base = layer64.base_layer(x_ref)
        ref_probs, gates = layer64.route(x_ref)
        codes = torch.einsum("...d,nrd->...nr", x_ref * keep, layer64.lora_A)
        ref = base + torch.einsum("...nr,nor->...o", codes * (layer64.scaling * gates)[..., None],
                                  layer64.lora_B)
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.float32
    error = (out.double().cpu() - ref).abs().max() / ref.abs().max()
    assert error < 2e-2, error
    g = torch.randn_like(ref)
    gp = torch.randn_like(ref_probs)
    got = torch.autograd.grad((out.float() * g.to(CUDA, torch.float32)).sum()
                              + (probs * gp.to(CUDA, torch.float32)).sum(),
                              [x_gpu, *layer.expert_weights()])
    want = torch.autograd.grad((ref * g).sum() + (ref_probs * gp).sum(),
                               [x_ref, *layer64.expert_weights()])
    for name, a, b in zip(["x", "router", "A", "B"], got, want, strict=True):
        assert a.device.type == "cuda"
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
    final = json.loads((result.output_dir / "final_metrics.json").read_text())
    assert final["device"] == "cuda"  # trained there, not only evaluated there
    model, _, saved = load_for_eval(run=result.output_dir)
    assert model.device.type == "cuda" and saved["dtype"] == "auto"


def test_the_probe_on_the_gpu_equals_the_hand_computed_logprobs(tiny_model_dir):
    """The probe's packed one-pass scoring (block mask, the shared lead's KV cache) on the
    device (fp32: no rounding to hide behind) against one plain CPU forward per option."""
    from test_probe import LED_FACTS as FACTS
    from test_probe import hand_logprob

    from loramoe.evaluate.probe import probe_facts
    from loramoe.model import load_base_model

    cpu_model, tokenizer = load_base_model(str(tiny_model_dir))
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    got = probe_facts(gpu_model, tokenizer, FACTS, batch_size=3)
    for row, fact in FACTS.iterrows():
        hand = hand_logprob(cpu_model, tokenizer, fact.prompt, fact.answer_prefix,
                            fact.choices[0])
        assert got["gold_logprob"][row] == pytest.approx(hand, rel=1e-4, abs=1e-4)


def test_a_loramoe_run_is_evaluated_on_the_gpu(tiny_model_dir, gpu_train_file, tmp_path):
    """evaluate(): generation with the router recorder, scoring, the router analysis and the
    probe, for the base and a trained LoRAMoE run, with model and inputs on the device."""
    from loramoe.evaluate import evaluate
    from loramoe.train import TrainConfig, train

    rows = [{"id": f"k{i}", "task": "capital", "task_type": "knowledge",
             "prompt": f"What is the capital of country {i}?", "answers": [f"city {i}"],
             "metric": "contains", "answer_prefix": f"The capital of country {i} is",
             "choices": [f"city {i}", f"city {i + 1}", f"city {i + 2}"]} for i in range(12)]
    rows += [{"id": f"d{i}", "task": "parity", "task_type": "downstream",
              "prompt": f"Is {i} even? Answer yes or no.", "answers": ["yes" if i % 2 == 0
                                                                        else "no"],
              "metric": "accuracy"} for i in range(12)]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = evaluate(eval_file, tmp_path / "base", model=str(tiny_model_dir), progress=False,
                    generate_per_task=12)
    run = tmp_path / "run"
    train(TrainConfig(model=str(tiny_model_dir), train_file=str(gpu_train_file),
                      output_dir=str(run), max_steps=2, batch_size=8, max_length=64),
          progress=False)
    tuned = evaluate(eval_file, tmp_path / "tuned", run=run, base_dir=tmp_path / "base",
                     progress=False, generate_per_task=12)
    assert base["probe"]["facts"] == tuned["probe"]["facts"] == 12
    assert tuned["generated_items"] == 24 and "probe_retention" in tuned
    assert "router_separation" in tuned
