"""The fp32 attention product used to train bf16 models on a CPU (loramoe/backends/attention.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from loramoe.backends import attention
from loramoe.backends.attention import NAME, use_training_attention

CPU = torch.device("cpu")


def left_padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 11), generator=gen)  # (B, T)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: later tokens would attend to it if no mask reached them
    mask[1, :1] = 0
    return ids, mask


def loss_and_input_grad(model, ids, mask, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = model.get_input_embeddings()(ids).detach().to(dtype).requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits  # (B, T, V)
    keep = mask.bool()
    (logits[keep].float() ** 2).mean().backward()
    return logits[keep].double(), embeds.grad[keep].double()


def test_bf16_with_fp32_attention_matches_an_fp64_reference(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    reference = copy.deepcopy(tiny_model).double()
    ref_logits, ref_grad = loss_and_input_grad(reference, ids, mask, torch.float64)
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert use_training_attention(bf16, torch.bfloat16, CPU)
    logits, grad = loss_and_input_grad(bf16, ids, mask, torch.bfloat16)
    assert bf16.config._attn_implementation == NAME
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() < 0.03 * scale
    assert (grad - ref_grad).abs().max() < 0.05 * ref_grad.abs().max()


def test_padding_stays_masked():
    # transformers passes a custom attention no mask unless a mask function is registered
    # for its name; left padding would then leak into every later token
    model = make_tiny_llama().to(torch.bfloat16)
    use_training_attention(model, torch.bfloat16, CPU)
    ids, mask = left_padded_batch(model.config.vocab_size)
    other = ids.clone()
    other[0, :4] = (other[0, :4] + 7) % model.config.vocab_size  # only padded positions differ
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits[0, 4:]  # (T-4, V)
        b = model(input_ids=other, attention_mask=mask).logits[0, 4:]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_product_runs_in_fp32_under_bf16_autocast(monkeypatch):
    # full SFT trains fp32 master weights under bf16 autocast: the projections give bf16
    # q, k, v, and autocast must not turn the fp32 copies back into bf16
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        out = original(query, key, value, *args, **kwargs)
        seen.append(out.dtype)  # autocast casts inside the op: its output shows what ran
        return out

    # transformers calls it as torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    model = make_tiny_llama()
    use_training_attention(model, torch.bfloat16, CPU)
    ids, mask = left_padded_batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert seen and set(seen) == {torch.float32}
    assert logits.dtype == torch.bfloat16  # the projections around it still ran in bf16


@pytest.mark.parametrize(("dtype", "device", "implementation", "switched"), [
    (torch.bfloat16, CPU, "sdpa", True),
    (torch.float32, CPU, "sdpa", False),  # fp32's own kernel is the fast one
    (torch.float16, CPU, "sdpa", False),
    (torch.bfloat16, torch.device("cuda"), "sdpa", False),  # GPUs keep their flash kernels
    (torch.bfloat16, CPU, "eager", False),  # a choice made on purpose is left alone
])
def test_which_models_switch(dtype, device, implementation, switched):
    model = make_tiny_llama()
    model.set_attn_implementation(implementation)
    assert use_training_attention(model, dtype, device) is switched
    assert model.config._attn_implementation == (NAME if switched else implementation)


def test_a_peft_wrapped_model_switches_its_base():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["up_proj"]))
    assert use_training_attention(model, torch.bfloat16, CPU)
    assert model.get_base_model().config._attn_implementation == NAME


def test_register_is_idempotent():
    attention.register()
    attention.register()
    from transformers import AttentionInterface

    assert NAME in AttentionInterface._global_mapping
