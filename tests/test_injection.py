"""apply_loramoe on stock transformers models: targets, freezing, routers, generate."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, fill_adapters, make_tiny_llama

from loramoe import (
    ConfigError,
    LoRAMoEConfig,
    apply_loramoe,
    collect_router_probs,
    localized_balancing_loss,
    parameter_summary,
)
from loramoe.injection import enable_checkpointing, loramoe_layers
from loramoe.layer import LoRAMoELinear


def tiny(model_type: str):
    """A tiny random model of each family with a default FFN target list."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB)
    configs = {
        "llama": transformers.LlamaConfig(hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=2, num_attention_heads=2, **common),
        "mistral": transformers.MistralConfig(hidden_size=16, intermediate_size=24,
                                              num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1, **common),
        "qwen2": transformers.Qwen2Config(hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, **common),
        "gpt2": transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, **common),
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=16, intermediate_size=24,
                                               num_hidden_layers=2, num_attention_heads=2,
                                               **common),
        "opt": transformers.OPTConfig(hidden_size=16, ffn_dim=24, num_hidden_layers=2,
                                      num_attention_heads=2, word_embed_proj_dim=16, **common),
        "phi": transformers.PhiConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, **common),
    }
    return transformers.AutoModelForCausalLM.from_config(configs[model_type]).eval()


EXPECTED_SUFFIXES = {
    "llama": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "mistral": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "opt": {"fc1", "fc2"},
    "phi": {"mlp.fc1", "mlp.fc2"},
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED_SUFFIXES))
def test_default_targets_are_the_ffn_linears(model_type):
    model = tiny(model_type)
    ids = torch.randint(3, VOCAB, (2, 7))
    before = model(ids).logits
    apply_loramoe(model, LoRAMoEConfig(rank=2,
                                       expert_types={"knowledge": 2, "downstream": 2}))
    names = [name for name, _ in loramoe_layers(model)]
    suffixes = {".".join(n.split(".")[-2:]) if "mlp" in n else n.split(".")[-1] for n in names}
    assert suffixes == EXPECTED_SUFFIXES[model_type]
    assert len(names) == 2 * len(EXPECTED_SUFFIXES[model_type])  # every layer of both blocks
    assert not any("attn" in n or "attention" in n for n in names)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # identity at init


def test_only_adapter_parameters_are_trainable_and_get_grads(tiny_model):
    apply_loramoe(tiny_model, LoRAMoEConfig())
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(n.rsplit(".", 1)[-1] in {"router_weight", "lora_A", "lora_B"} for n in trainable)
    fill_adapters(tiny_model, scale=0.2)  # larger router weights saturate the softmax: grad 0
    tiny_model.train()
    ids = torch.randint(3, VOCAB, (2, 8))
    tiny_model(ids, labels=ids).loss.backward()
    for name, param in tiny_model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_base_weights_bit_identical_after_optimizer_steps(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_loramoe(tiny_model, LoRAMoEConfig())
    tiny_model.train()
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, VOCAB, (4, 8))
    for _ in range(3):
        optim.zero_grad()
        tiny_model(ids, labels=ids).loss.backward()
        optim.step()
    after = tiny_model.state_dict()
    for key, value in before.items():
        new_key = key if key in after else key.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(after[new_key], value), key
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in loramoe_layers(tiny_model))


def test_new_layers_follow_the_models_mode():
    """Regression: layers created by apply_loramoe were in training mode inside an eval model,
    so expert dropout made repeated forwards differ."""
    model = make_tiny_llama().eval()
    apply_loramoe(model)
    fill_adapters(model)
    assert not any(layer.training for _, layer in loramoe_layers(model))
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    training = apply_loramoe(make_tiny_llama().train())
    assert all(layer.training for _, layer in loramoe_layers(training))


def test_unmatched_targets_name_the_modules_seen(tiny_llama):
    with pytest.raises(ConfigError, match=r"target_modules.*match no.*mlp\.gate_proj"):
        apply_loramoe(tiny_llama, LoRAMoEConfig(target_modules=["w_in"]))
    assert not loramoe_layers(tiny_llama)
    # a typo beside a name that matches: before, up_proj alone was wrapped, silently
    with pytest.raises(ConfigError, match=r"target_modules: \['gate_projj'\] match no .*\(of "
                                          r"\['up_proj', 'gate_projj'\]\)"):
        apply_loramoe(tiny_llama, LoRAMoEConfig(target_modules=["up_proj", "gate_projj"]))
    assert not loramoe_layers(tiny_llama)


def test_unknown_architecture_needs_explicit_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="no default FFN targets"):
        apply_loramoe(model)
    apply_loramoe(model, LoRAMoEConfig(target_modules=["0"]))
    assert isinstance(model[0], LoRAMoELinear)


def test_apply_twice_is_refused(tiny_llama):
    apply_loramoe(tiny_llama)
    with pytest.raises(ValueError, match="already has LoRAMoE"):
        apply_loramoe(tiny_llama)


def test_paper_parameter_share_on_llama2_7b_shape():
    """The paper reports 0.57% trainable parameters for Llama-2-7B with N=6, r=4."""
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, vocab_size=32000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    apply_loramoe(model, LoRAMoEConfig())
    summary = parameter_summary(model)
    assert summary.percent == pytest.approx(0.57, abs=0.005)
    assert len(loramoe_layers(model)) == 96


def test_collect_router_probs_one_per_layer_in_module_order(tiny_llama):
    apply_loramoe(tiny_llama)
    ids = torch.randint(3, VOCAB, (3, 5))
    tiny_llama(ids)
    probs = collect_router_probs(tiny_llama)
    assert len(probs) == 6  # 2 blocks × gate/up/down
    assert all(p.shape == (3, 5, 6) for p in probs)
    layer_names = [n for n, _ in loramoe_layers(tiny_llama)]
    assert layer_names[0].endswith("layers.0.mlp.gate_proj")
    assert layer_names[-1].endswith("layers.1.mlp.down_proj")


def test_router_probs_keep_grad_in_training_and_lbc_trains_routers(tiny_llama):
    apply_loramoe(tiny_llama)
    tiny_llama.train()
    ids = torch.randint(3, VOCAB, (2, 6))
    tiny_llama(ids)
    probs = collect_router_probs(tiny_llama)
    assert all(p.requires_grad for p in probs)
    loss = localized_balancing_loss(
        probs, torch.ones(2, 6), torch.tensor([0, 1]), [0, 0, 0, 1, 1, 1], delta=0.1
    )
    loss.backward()
    layer = loramoe_layers(tiny_llama)[0][1]
    assert layer.router_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_plugin_and_no_memory_growth(arch, tiny_llama, tiny_gpt2):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    apply_loramoe(model)
    fill_adapters(model)
    ids = torch.randint(3, VOCAB, (2, 4))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)
    # During generate each step overwrites the stored probabilities: the last step's 1 token.
    probs = collect_router_probs(model)
    assert all(p.shape == (2, 1, 6) and not p.requires_grad for p in probs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_with_half_precision_base(tiny_llama, dtype):
    model = tiny_llama.to(dtype)
    apply_loramoe(model)
    fill_adapters(model)
    ids = torch.randint(3, VOCAB, (1, 4))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    layer = loramoe_layers(model)[0][1]
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == dtype


def test_generate_with_checkpointing_enabled(tiny_llama):
    apply_loramoe(tiny_llama)
    fill_adapters(tiny_llama)
    ids = torch.randint(3, VOCAB, (2, 4))
    expected = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    enable_checkpointing(tiny_llama)
    tiny_llama.eval()
    out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_gives_same_grads_including_lbc(dropout):
    # With dropout, the recomputed forward must redraw the same dropped positions.
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_llama()
        apply_loramoe(model, LoRAMoEConfig(dropout=dropout))
        fill_adapters(model, scale=0.2)
        model.train()
        if checkpointing:
            enable_checkpointing(model)
        ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        out = model(ids, labels=ids)
        lbc = localized_balancing_loss(collect_router_probs(model), None, torch.tensor([0, 1]),
                                       [0, 0, 0, 1, 1, 1])
        (out.loss + 0.1 * lbc).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(plain, ckpt, rtol=1e-5, atol=1e-7)
