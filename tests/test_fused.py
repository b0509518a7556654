"""The fused autograd node against the plain-autograd path and finite differences."""

from __future__ import annotations

import pytest
import torch
from loramoe.fused import FusedLoRAMoE
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramoe import LoRAMoEConfig
from loramoe.layer import LoRAMoELinear, dense_softmax


def make_layer(kind="linear", top_k=None, dropout=0.3, bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=bias) if kind == "linear" else Conv1D(20, 12)
    if kind == "conv1d":
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    config = LoRAMoEConfig(rank=3, alpha=6.0, dropout=dropout, top_k=top_k)
    layer = LoRAMoELinear(base, config).to(dtype).train()
    with torch.no_grad():
        for param in layer.expert_weights():
            param.normal_(std=0.5)
    return layer


def run(forward, layer, x, seed=1):
    """Outputs, probs and the grads of x and every adapter weight for a loss that also
    reaches the router probabilities (as the LBC does)."""
    torch.manual_seed(seed)  # same dropped positions for both paths
    out, probs = forward(x)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum()
    loss = loss + 3.0 * probs.square().sum()
    grads = torch.autograd.grad(loss, [x, *layer.expert_weights()])
    return out, probs, grads


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_path_equals_plain_autograd_path(kind, top_k, dropout):
    layer = make_layer(kind, top_k, dropout)
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    assert layer.can_fuse(x)
    fused = run(layer.fused_forward, layer, x)
    plain = run(layer.reference_forward, layer, x)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-12, atol=1e-12)
    for name, got, want in zip(["x", "router", "A", "B"], fused[2], plain[2], strict=True):
        assert want.abs().sum() > 0, f"grad of {name} is zero: the comparison would be vacuous"
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_fused_node_takes_leading_dims_and_a_strided_input():
    layer = make_layer(dropout=0.3)
    x = torch.randn(3, 12, 5, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
    assert not x.is_contiguous()  # (3, 5, 12), as a permuted activation would arrive
    fused = run(layer.fused_forward, layer, x)
    plain = run(lambda t: layer.reference_forward(t.reshape(-1, 12)), layer, x)
    assert fused[0].shape == (3, 5, 20) and fused[1].shape == (3, 5, 6)
    torch.testing.assert_close(fused[0].reshape(-1, 20), plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[1].reshape(-1, 6), plain[1], rtol=1e-12, atol=1e-12)
    for name, got, want in zip(["x", "router", "A", "B"], fused[2], plain[2], strict=True):
        assert want.abs().sum() > 0, f"grad of {name} is zero: the comparison would be vacuous"
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_the_layer_output_can_be_modified_in_place():
    """The node's output is a tensor of its own, not a view made inside a custom Function
    (autograd forbids in-place changes to those), so a model may scale it in place."""
    layer = make_layer(dropout=0.0)
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 4, 20) and out._base is None
    out.mul_(2.0)
    weights = [x, *layer.expert_weights()]
    got = torch.autograd.grad(out.square().sum(), weights)
    want_out = layer.reference_forward(x.reshape(-1, 12))[0] * 2.0
    want = torch.autograd.grad(want_out.square().sum(), weights)
    for name, g, w in zip(["x", "router", "A", "B"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("with_dropout", [False, True])
def test_fused_backward_passes_gradcheck(top_k, with_dropout):
    layer = make_layer(top_k=top_k, bias=True)
    route = None if layer.dense else layer.gates_from_logits
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    dropped = torch.tensor([0, 7, 13, 40, 59]) if with_dropout else None
    weight_t = layer.base_layer.weight.t()
    bias = layer.base_layer.bias

    def f(x, router_weight, lora_A, lora_B):
        return FusedLoRAMoE.apply(x, router_weight, lora_A, lora_B, weight_t, bias, route,
                                  layer.scaling * 1.25, dropped)

    assert torch.autograd.gradcheck(f, (x, *layer.expert_weights()))


def test_only_the_grads_asked_for_are_computed():
    layer = make_layer(dropout=0.0)
    x = torch.randn(4, 12, dtype=torch.float64)  # a first layer: input needs no grad
    out, _ = layer.fused_forward(x)
    assert out.grad_fn is not None
    out.sum().backward()
    assert all(p.grad is not None for p in layer.expert_weights())
    layer.requires_grad_(False)  # frozen adapters (e.g. scoring), input still needs grad
    x.requires_grad_(True)
    out, _ = layer.fused_forward(x)
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    assert grad_x.shape == x.shape and grad_x.abs().sum() > 0


def test_dense_softmax_matches_torch():
    logits = torch.randn(50, 6, dtype=torch.float64) * 30
    probs, gates = dense_softmax(logits)
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=1e-14, atol=1e-14)
    assert gates is probs


def test_can_fuse_only_for_one_float_dtype_and_a_plain_frozen_base():
    x32 = torch.randn(3, 12)
    layer = make_layer(dtype=torch.float32)
    assert layer.can_fuse(x32)
    assert not layer.can_fuse(x32.double())  # input dtype differs from the weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.can_fuse(x32)
    layer.base_layer.weight.requires_grad_(True)
    assert not layer.can_fuse(x32)  # a trainable base needs its own grad: plain autograd
    layer.base_layer.weight.requires_grad_(False)

    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    assert not layer.can_fuse(x32)
    layer(x32)
    assert calls == [1], "a hook on the base layer must still run"
    handle.remove()

    bf16 = LoRAMoELinear(nn.Linear(12, 20).to(torch.bfloat16), LoRAMoEConfig())
    assert not bf16.can_fuse(x32.to(torch.bfloat16))


def test_fused_training_keeps_less_alive_than_plain_autograd():
    """The dropped copy of the input is rebuilt in backward, not saved: about one
    activation per layer less than plain autograd (or PEFT's LoRA) keeps."""
    layer = make_layer(dropout=0.05, dtype=torch.float32)
    x = torch.randn(256, 12, requires_grad=True)

    def saved_bytes(forward) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(x)
        return sum(seen.values())

    fused, plain = saved_bytes(layer.fused_forward), saved_bytes(layer.reference_forward)
    assert fused < plain - 0.9 * x.numel() * x.element_size(), (fused, plain)


def test_a_stock_fp32_model_trains_through_the_fused_node(tiny_llama):
    from loramoe import apply_loramoe
    from loramoe.injection import loramoe_layers

    apply_loramoe(tiny_llama, LoRAMoEConfig()).train()
    seen = []
    for _, layer in loramoe_layers(tiny_llama):
        # The node takes the (B, T, d) input as is: no reshape/view nodes around it.
        layer.register_forward_hook(lambda mod, args, out: seen.append(type(out.grad_fn).__name__))
    tiny_llama(torch.randint(3, 50, (2, 5)))
    assert seen and set(seen) == {"FusedLoRAMoEBackward"}, seen
