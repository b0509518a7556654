"""The adapter's thin GEMMs through oneDNN: same products as mm, and the right fallbacks."""

from __future__ import annotations

import pytest
import torch
from loramoe.cpu_kernels import set_cpu_kernels
from loramoe.thin_gemm import onednn_enabled, set_onednn, thin_mm
from test_fused import make_layer, run

from loramoe import thin_gemm

needs_onednn = pytest.mark.skipif(
    not onednn_enabled(), reason="torch built without oneDNN (mkldnn) or LORAMOE_ONEDNN=0"
)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Route every product (however small) to oneDNN and count the calls that went there.
    The compiled kernels (cpu_kernels.py), which take the products with x otherwise, are off."""
    previous = set_cpu_kernels(False)
    calls = []
    real = thin_gemm._linear

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(thin_gemm, "_linear", counting)
    monkeypatch.setattr(thin_gemm, "MIN_MACS", 0)
    yield calls
    set_cpu_kernels(previous)


def operands(transpose_a: bool, transpose_b: bool, m=37, k=29, p=11):
    a = torch.randn(k, m).t() if transpose_a else torch.randn(m, k)  # (m, k)
    b = torch.randn(p, k).t() if transpose_b else torch.randn(k, p)  # (k, p)
    return a, b


@needs_onednn
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_thin_mm_equals_mm_for_every_layout(onednn_calls, transpose_a, transpose_b):
    torch.manual_seed(0)
    a, b = operands(transpose_a, transpose_b)
    got = thin_mm(a, b)
    assert len(onednn_calls) == 1, "the product did not go through oneDNN"
    want = (a.double() @ b.double()).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_thin_mm_takes_a_column_slice(onednn_calls):
    torch.manual_seed(0)
    wide, b = torch.randn(37, 30), torch.randn(24, 11)
    codes = wide[:, 6:]  # (37, 24) with row stride 30: a strided operand, not a copy
    torch.testing.assert_close(thin_mm(codes, b), codes @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(thin_mm(codes.t(), wide), codes.t() @ wide, rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 2


@needs_onednn
def test_thin_mm_adds_a_bias_on_both_routes(onednn_calls, monkeypatch):
    torch.manual_seed(0)
    a, b = operands(False, True)
    bias = torch.randn(b.shape[1])
    want = (a.double() @ b.double() + bias.double()).float()
    torch.testing.assert_close(thin_mm(a, b, bias), want, rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 1
    monkeypatch.setattr(thin_gemm, "MIN_MACS", 10**9)
    torch.testing.assert_close(thin_mm(a, b, bias), want, rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 1


@needs_onednn
def test_thin_mm_falls_back_to_mm_where_onednn_does_not_fit(onednn_calls, monkeypatch):
    torch.manual_seed(0)
    a, b = operands(False, False)
    thin_mm(a.double(), b.double())  # fp64: oneDNN has no fp64 GEMM
    thin_mm(a.requires_grad_(), b)  # under grad mode: the op has no autograd formula
    with torch.no_grad():
        thin_mm(a, b)  # fine without grad mode
    assert len(onednn_calls) == 1
    monkeypatch.setattr(thin_gemm, "MIN_MACS", 10**9)  # small products: mm's lower overhead
    thin_mm(a.detach(), b)
    assert len(onednn_calls) == 1


@needs_onednn
def test_set_onednn_turns_the_route_off_and_back(onednn_calls):
    a, b = operands(False, False)
    previous = set_onednn(False)
    try:
        assert previous is True and not onednn_enabled()
        thin_mm(a, b)
        assert onednn_calls == []
    finally:
        set_onednn(previous)
    thin_mm(a, b)
    assert len(onednn_calls) == 1


@needs_onednn
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fp32_fused_layer_through_onednn_matches_fp64(onednn_calls, top_k, dropout):
    """Every adapter GEMM of the fused node routed to oneDNN, against the fp64 formula."""
    layer64 = make_layer(top_k=top_k, dropout=dropout)
    layer32 = make_layer(top_k=top_k, dropout=dropout, dtype=torch.float32)
    layer32.load_state_dict(layer64.state_dict())
    torch.manual_seed(2)
    x64 = torch.randn(33, 12, dtype=torch.float64)
    x32 = x64.float().requires_grad_(True)
    x64.requires_grad_(True)
    got = run(layer32.fused_forward, layer32, x32)
    # forward: [logits; codes]ᵀ (two GEMMs with dropout: different inputs) and mixed·B;
    # backward: grad_B, grad_mixed, the adapter's share of grad_x (with dropout the router's
    # part is added by addmm_) and the grad of [router; A] (two GEMMs with dropout).
    assert len(onednn_calls) == (6 if dropout == 0 else 8), onednn_calls
    want = run(layer64.reference_forward, layer64, x64)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-5)
    for name, g, w in zip(["x", "router", "A", "B"], got[2], want[2], strict=True):
        assert w.abs().sum() > 0, f"grad of {name} is zero: the comparison would be vacuous"
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-3 * w.abs().max().item(),
                                   msg=f"grad of {name}")


@needs_onednn
def test_eval_forward_under_inference_mode_goes_through_onednn(onednn_calls):
    """Evaluation and generate run without grad: the route must hold there too."""
    layer = make_layer(dropout=0.3, dtype=torch.float32).eval()
    x = torch.randn(5, 7, 12)
    with torch.inference_mode():
        got = layer(x)
    assert len(onednn_calls) == 2  # [logits; codes]ᵀ and mixed·B (+ bias)
    with torch.no_grad():
        want = layer.reference_forward(x.reshape(-1, 12))[0].view(5, 7, 20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
