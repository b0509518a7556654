"""The fused backend against the layer's formula (fp64), gradcheck, where it applies, and the
seam: the layer imports no backend, and a model runs with or without one."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramoe import LoRAMoEConfig, apply_loramoe
from loramoe.backends import attach_backend, select_backend
from loramoe.backends.fused import FusedBackend, FusedLoRAMoE, covers
from loramoe.injection import loramoe_layers
from loramoe.layer import LoRAMoELinear

NAMES = ["x", "router", "A", "B"]


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
            param.normal_()
    return layer


class FixedMask(nn.Module):
    """nn.Dropout with a given mask, so the formula sees the same dropout as the backend."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(x.shape) / (1 - self.p)


def outputs_and_grads(forward, layer, x):
    """(out, probs, grads of x and the adapters) of a loss on out *and* probs (as the LBC)."""
    x = x.detach().clone().requires_grad_(True)
    out, probs = forward(x)
    # drawn in fp64 then cast, so an fp32 run gets the same cotangents as an fp64 one
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64).to(out.dtype)
    g_probs = torch.randn(probs.shape, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64).to(probs.dtype)
    loss = (out * g_out).sum() + (probs * g_probs).sum()
    return out, probs, torch.autograd.grad(loss, [x, *layer.expert_weights()])


def same_dropout(formula_layer, x, monkeypatch) -> None:
    """One dropout draw for both: the backend draws these positions, the formula layer
    (an identical copy) applies the same mask."""
    from loramoe.backends import fused

    p = formula_layer.dropout.p
    dropped = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < p
    positions = dropped.flatten().nonzero().flatten()
    monkeypatch.setattr(fused, "draw_dropped", lambda numel, q, device: positions)
    formula_layer.dropout = FixedMask(~dropped, p)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_backend_equals_the_formula(kind, top_k, dropout, monkeypatch):
    layer, formula_layer = make_layer(kind, top_k, dropout), make_layer(kind, top_k, dropout)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    same_dropout(formula_layer, x, monkeypatch)
    assert covers(layer, x)
    got = outputs_and_grads(lambda t: FusedBackend()(layer, t), layer, x)
    want = outputs_and_grads(formula_layer.formula, formula_layer, x)
    assert got[0].shape == (3, 5, 20) and got[1].shape == (3, 5, 6)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for name, g, w in zip(NAMES, got[2], want[2], strict=True):
        assert w.abs().sum() > 0, f"grad of {name} is zero: the comparison would be vacuous"
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("top_k", [None, 2])
def test_a_bool_mask_and_its_positions_give_the_same_node(top_k):
    """The GPU hands the node a dense bool mask, the CPU the positions: same values."""
    layer = make_layer(top_k=top_k)
    route = None if layer.dense else layer.gates_from_logits
    weight_t, bias = layer.base_layer.weight.t(), layer.base_layer.bias
    x = torch.randn(4, 6, 12, dtype=torch.float64)
    mask = torch.rand(x.numel(), generator=torch.Generator().manual_seed(4)) < 0.3
    results = []
    for dropped in (mask, mask.nonzero().flatten()):
        xi = x.clone().requires_grad_(True)
        out, probs = FusedLoRAMoE.apply(xi, *layer.expert_weights(), weight_t, bias, route,
                                        layer.scaling / 0.7, dropped)
        grads = torch.autograd.grad(out.square().sum() + probs.sum(), [xi, *layer.expert_weights()])
        results.append((out, probs, *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("with_dropout", [False, True])
def test_fused_node_passes_gradcheck(top_k, with_dropout):
    layer = make_layer(top_k=top_k)
    route = None if layer.dense else layer.gates_from_logits
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    dropped = torch.tensor([0, 7, 13, 40, 59]) if with_dropout else None
    weight_t, bias = layer.base_layer.weight.t(), layer.base_layer.bias

    def f(x, router_weight, lora_A, lora_B):
        return FusedLoRAMoE.apply(x, router_weight, lora_A, lora_B, weight_t, bias, route,
                                  layer.scaling * 1.25, dropped)

    assert torch.autograd.gradcheck(f, (x, *layer.expert_weights()))


def test_fp32_fused_backend_matches_the_fp64_formula():
    layer64 = make_layer(dropout=0.0)
    layer32 = copy.deepcopy(layer64).float()
    x = torch.randn(64, 12, dtype=torch.float64)
    got = outputs_and_grads(lambda t: FusedBackend()(layer32, t), layer32, x.float())
    want = outputs_and_grads(layer64.formula, layer64, x)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-4)
    for name, g, w in zip(NAMES, got[2], want[2], strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-3, msg=f"grad of {name}")


def test_bf16_base_through_the_node_matches_the_fp64_formula_to_bf16_precision():
    """bf16 base, fp32 adapters: products in bf16, gating in fp32, fp32 gradients."""
    layer64 = make_layer(dropout=0.0)
    with torch.no_grad():
        layer64.base_layer.weight.copy_(layer64.base_layer.weight.to(torch.bfloat16))
        layer64.base_layer.bias.copy_(layer64.base_layer.bias.to(torch.bfloat16))
    layer = copy.deepcopy(layer64).float()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(64, 12, dtype=torch.float64).to(torch.bfloat16).double()
    got = outputs_and_grads(lambda t: FusedBackend()(layer, t), layer, x.to(torch.bfloat16))
    want = outputs_and_grads(layer64.formula, layer64, x)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[2][1:])  # the adapters' gradients
    for name, g, w in zip(["out", "probs", *NAMES], [got[0], got[1], *got[2]],
                          [want[0], want[1], *want[2]], strict=True):
        error = (g.double() - w).abs().max() / w.abs().max()
        assert error < 2e-2, f"{name}: relative error {error:.2e}"


def test_the_output_can_be_modified_in_place():
    """The node's output is a tensor of its own, not a view made inside a custom Function
    (autograd forbids in-place changes to those), so a model may scale it in place."""
    layer = make_layer(dropout=0.0)
    layer.backend = FusedBackend()
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out._base is None
    out.mul_(2.0)
    weights = [x, *layer.expert_weights()]
    got = torch.autograd.grad(out.square().sum(), weights)
    want = torch.autograd.grad((layer.formula(x)[0] * 2.0).square().sum(), weights)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_the_backend_declines_what_it_does_not_cover():
    layer = make_layer(dtype=torch.float32)
    x32 = torch.randn(3, 12)
    assert covers(layer, x32)
    assert not covers(layer, x32.double())  # input dtype differs from the weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not covers(layer, x32)
    layer.base_layer.weight.requires_grad_(True)
    assert not covers(layer, x32)  # a trainable base needs its own grad
    layer.base_layer.weight.requires_grad_(False)
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    assert not covers(layer, x32)
    layer.backend = FusedBackend()
    layer(x32)
    assert calls == [1], "a hook on the base layer must still run (through the formula)"
    handle.remove()
    bf16 = LoRAMoELinear(nn.Linear(12, 20).to(torch.bfloat16), LoRAMoEConfig())
    assert covers(bf16, x32.to(torch.bfloat16))  # bf16 base, fp32 adapters: covered
    fp16 = LoRAMoELinear(nn.Linear(12, 20).to(torch.float16), LoRAMoEConfig())
    assert not covers(fp16, x32.to(torch.float16))  # fp16 takes the formula
    assert FusedBackend()(fp16, x32.to(torch.float16)) is None
    assert not covers(bf16, x32.to(torch.bfloat16).to("meta"))  # CPU and CUDA only
    assert not covers(bf16, x32.to(torch.bfloat16), devices=("cuda",))  # where it may run


def test_a_model_trains_through_the_fused_node_and_the_same_without_it(tiny_llama):
    apply_loramoe(tiny_llama, LoRAMoEConfig(dropout=0.0)).train()
    plain = copy.deepcopy(tiny_llama)
    attach_backend(plain, "formula")
    seen = []
    for _, layer in loramoe_layers(tiny_llama):
        assert isinstance(layer.backend, FusedBackend)
        layer.register_forward_hook(lambda mod, args, out: seen.append(type(out.grad_fn).__name__))
    ids = torch.randint(3, 50, (2, 5))
    fused_loss = tiny_llama(ids, labels=ids).loss
    plain_loss = plain(ids, labels=ids).loss
    assert set(seen) == {"FusedLoRAMoEBackward"}, seen
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)


def test_select_backend_names():
    assert select_backend("formula") is None
    assert isinstance(select_backend("auto"), FusedBackend)
    with pytest.raises(ValueError, match=r"backend: 'cuda' is not one of"):
        select_backend("cuda")


def test_importing_the_layer_imports_no_backend():
    code = ("import sys, loramoe.layer, loramoe; "
            "print(sorted(m for m in sys.modules if m.startswith('loramoe.backends')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout
