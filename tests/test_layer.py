"""LoRAMoELinear's formula (no backend attached) against a per-expert loop written straight
from the paper's Eq. 5, in fp64 with random non-zero weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramoe import LoRAMoEConfig
from loramoe.layer import LoRAMoELinear


def reference_forward(x, base: nn.Module, router_w, A, B, scaling, top_k=None):
    """o = base(x) + scaling · Σ_i ω_i(x) · B_i A_i x, one expert at a time (no dropout)."""
    out = base(x)
    probs = torch.softmax(x @ router_w.T, dim=-1)
    if top_k is not None:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = kept / kept.sum(dim=-1, keepdim=True)
    for i in range(A.shape[0]):
        out = out + scaling * probs[..., i : i + 1] * ((x @ A[i].T) @ B[i].T)
    return out


def make_layer(kind: str, top_k=None, d_in=12, d_out=20, seed=0) -> LoRAMoELinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    if kind == "conv1d":
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    config = LoRAMoEConfig(rank=3, alpha=6.0, dropout=0.0, top_k=top_k)
    layer = LoRAMoELinear(base, config).double()
    with torch.no_grad():
        for param in layer.expert_weights():
            param.normal_()
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_formula_matches_per_expert_loop_outputs_and_grads(kind, top_k):
    layer = make_layer(kind, top_k)
    router_w, A, B = layer.expert_weights()
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = layer(x)
    ref = reference_forward(x_ref, layer.base_layer, router_w, A, B, layer.scaling, top_k)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, router_w, A, B], grad_out)
    ref_grads = torch.autograd.grad(ref, [x_ref, router_w, A, B], grad_out)
    for name, got, want in zip(["x", "router", "A", "B"], got_grads, ref_grads, strict=True):
        assert want.abs().sum() > 0, f"reference grad of {name} is zero: test would be vacuous"
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_top_k_gates_only_k_experts_per_token():
    layer = make_layer("linear", top_k=2)
    x = torch.randn(7, 12, dtype=torch.float64)
    probs, gates = layer.route(x)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(probs.sum(-1), torch.ones(7, dtype=torch.float64))


def test_identity_at_init_and_A_init_is_kaiming_per_expert():
    torch.manual_seed(0)
    base = nn.Linear(64, 16)
    layer = LoRAMoELinear(base, LoRAMoEConfig())
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), base(x))
    # nn.Linear-style bound 1/sqrt(fan_in) with fan_in = d_in, not r*d_in.
    bound = 1 / 64**0.5
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_router_probs_shape_and_replaced_each_forward():
    layer = make_layer("linear")
    first = layer(torch.randn(2, 3, 12, dtype=torch.float64))
    probs = layer.router_probs
    assert probs.shape == (2, 3, 6)
    assert first.shape == (2, 3, 20)
    layer(torch.randn(4, 1, 12, dtype=torch.float64))
    assert layer.router_probs.shape == (4, 1, 6)
    assert layer.router_probs is not probs


def test_bf16_base_keeps_fp32_router_and_adapters():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRAMoELinear(base, LoRAMoEConfig(dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.router_probs.dtype == torch.float32
    assert layer.lora_A.dtype == torch.float32
    expected = reference_forward(
        x.float(), lambda v: base(v.to(torch.bfloat16)).float(), *layer.expert_weights(),
        layer.scaling,
    )
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_dropout_applies_to_expert_input_only_in_training():
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(32, 8), LoRAMoEConfig(dropout=0.5))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(10, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_rejects_unsupported_base():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        LoRAMoELinear(nn.Embedding(4, 4), LoRAMoEConfig())


def test_formula_drops_the_experts_input_only():
    """Dropout hits what the experts read, never what the router reads (official code)."""
    torch.manual_seed(0)
    layer = make_layer("linear")
    layer.dropout.p = 0.5
    x = torch.randn(9, 12, dtype=torch.float64)
    layer.eval()
    clean_out, clean_probs = layer.formula(x)
    layer.train()
    out, probs = layer.formula(x)
    torch.testing.assert_close(probs, clean_probs, rtol=0, atol=0)
    assert not torch.allclose(out, clean_out)


def test_layer_without_backend_runs_the_formula():
    layer = make_layer("linear")
    assert layer.backend is None
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    out, probs = layer.formula(x)
    assert torch.equal(layer(x), out) and torch.equal(layer.router_probs, probs)


def test_a_backend_that_declines_falls_back_to_the_formula():
    layer = make_layer("linear")
    calls = []
    layer.backend = lambda mod, x: calls.append(x.shape) or None
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(layer(x), layer.formula(x)[0]) and calls == [(4, 12)]
