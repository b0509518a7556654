"""The compiled CPU kernels (loramoe/csrc/adapter_cpu.cpp) against float64 references, the
torch-op path, thread counts, and a failed build."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from loramoe.cpu_kernels import build, input_backward, input_forward, set_cpu_kernels
from loramoe.dropout import bernoulli_positions, zero_dropped_
from test_fused import make_layer, run

from loramoe import cpu_kernels

pytestmark = pytest.mark.skipif(
    os.environ.get("LORAMOE_CPU_KERNELS") == "0", reason="LORAMOE_CPU_KERNELS=0"
)

# (M, d, n_clean, P, p): tails in every blocking (rows by 8/4/256, columns by 8/16/64, lanes
# by 32), no router rows, more lanes than one pass, no and every position dropped.
SHAPES = [
    (2048, 576, 6, 30, 0.05),  # the benchmark's layer
    (37, 50, 6, 30, 0.3),
    (300, 64, 3, 40, 0.05),
    (5, 17, 0, 7, 0.5),
    (70, 96, 8, 136, 0.05),
    (9, 33, 2, 10, 0.0),
    (3, 16, 2, 10, 1.0),
]


@pytest.fixture
def kernel_use(monkeypatch):
    """Record, call by call, whether input_forward/input_backward took the kernel."""
    used = []
    real = cpu_kernels.use_kernel

    def recording(*args):
        used.append(real(*args))
        return used[-1]

    monkeypatch.setattr(cpu_kernels, "use_kernel", recording)
    return used


def ops():
    assert build(), "the CPU kernels did not build here (see the warning above)"
    return torch.ops.loramoe_cpu


def draw(m, d, p):
    if p == 0:
        return torch.empty(0, dtype=torch.int64)
    if p == 1:
        return torch.arange(m * d)
    return bernoulli_positions(m * d, p)


def operands(m, d, n_clean, p_rows, p, seed=0):
    torch.manual_seed(seed)
    x, w, gh_t = torch.randn(m, d), torch.randn(p_rows, d), torch.randn(p_rows, m)
    return x, w, gh_t, draw(m, d, p)


def reference(x, w, n_clean, dropped, gh_t):
    """The formulas in float64, with an explicit dropped copy of x."""
    x, w, gh_t = x.double(), w.double(), gh_t.double()
    x_dropped = zero_dropped_(x.clone(), dropped)
    h_t = torch.cat([w[:n_clean] @ x.t(), w[n_clean:] @ x_dropped.t()])
    grad_w = torch.cat([gh_t[:n_clean] @ x, gh_t[n_clean:] @ x_dropped])
    grad_x = gh_t[:n_clean].t() @ w[:n_clean] + zero_dropped_(gh_t[n_clean:].t() @ w[n_clean:],
                                                              dropped)
    return h_t, grad_x, grad_w


def assert_close32(got, want, name):
    # fp32 sums of up to 2,048 products of N(0,1) numbers against exact ones
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize(("m", "d", "n_clean", "p_rows", "p"), SHAPES)
def test_kernels_match_the_float64_formulas(m, d, n_clean, p_rows, p):
    x, w, gh_t, dropped = operands(m, d, n_clean, p_rows, p)
    h_t = ops().adapter_in_forward(x, w, n_clean, dropped)
    grad_x, grad_w = ops().adapter_in_backward(x, w, n_clean, dropped, gh_t, True, True)
    want = reference(x, w, n_clean, dropped, gh_t)
    assert h_t.shape == (p_rows, m) and grad_x.shape == (m, d) and grad_w.shape == (p_rows, d)
    for name, got, expected in zip(["h_t", "grad_x", "grad_w"], [h_t, grad_x, grad_w], want,
                                   strict=True):
        assert_close32(got, expected, name)


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_kernel_and_torch_op_paths_agree(monkeypatch, kernel_use, p):
    monkeypatch.setattr(cpu_kernels, "MIN_MACS", 0)
    x, w, gh_t, dropped = operands(40, 24, 6, 30, p, seed=3)
    dropped = dropped if p else None
    got = (input_forward(x, w, 6, dropped), *input_backward(x, w, 6, dropped, gh_t, True, True))
    previous = set_cpu_kernels(False)
    try:
        want = (input_forward(x, w, 6, dropped),
                *input_backward(x, w, 6, dropped, gh_t, True, True))
    finally:
        set_cpu_kernels(previous)
    assert kernel_use == [True, True, False, False]
    for name, g, e in zip(["h_t", "grad_x", "grad_w"], got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_backward_computes_only_what_is_asked(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_MACS", 0)
    x, w, gh_t, dropped = operands(20, 16, 2, 10, 0.2)
    assert cpu_kernels.use_kernel(x, w, dropped)
    full = input_backward(x, w, 2, dropped, gh_t, True, True)
    only_x = input_backward(x, w, 2, dropped, gh_t, True, False)
    only_w = input_backward(x, w, 2, dropped, gh_t, False, True)
    assert only_x[1] is None and only_w[0] is None
    assert torch.equal(only_x[0], full[0]) and torch.equal(only_w[1], full[1])


def test_results_do_not_depend_on_the_thread_count():
    x, w, gh_t, dropped = operands(1000, 200, 6, 30, 0.05)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = (ops().adapter_in_forward(x, w, 6, dropped),
                          *ops().adapter_in_backward(x, w, 6, dropped, gh_t, True, True))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[1], results[2], strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fp32_fused_layer_through_the_kernels_matches_fp64(monkeypatch, kernel_use, top_k,
                                                           dropout):
    monkeypatch.setattr(cpu_kernels, "MIN_MACS", 0)  # the test layer is tiny
    layer64 = make_layer(top_k=top_k, dropout=dropout)
    layer32 = make_layer(top_k=top_k, dropout=dropout, dtype=torch.float32)
    layer32.load_state_dict(layer64.state_dict())
    torch.manual_seed(2)
    x64 = torch.randn(3, 11, 12, dtype=torch.float64)
    x32 = x64.float().requires_grad_(True)
    x64.requires_grad_(True)
    got = run(layer32.fused_forward, layer32, x32)
    assert kernel_use == [True, True], "forward and backward should both run the kernels"
    want = run(lambda t: layer64.reference_forward(t.reshape(-1, 12)), layer64, x64)
    torch.testing.assert_close(got[0].reshape(-1, 20).double(), want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1].reshape(-1, 6).double(), want[1], rtol=1e-4, atol=1e-5)
    for name, g, w in zip(["x", "router", "A", "B"], got[2], want[2], strict=True):
        assert w.abs().sum() > 0, f"grad of {name} is zero: the comparison would be vacuous"
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-3 * w.abs().max().item(),
                                   msg=f"grad of {name}")


def test_where_the_kernels_do_not_apply_the_torch_ops_run(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_MACS", 0)
    x, w, _, dropped = operands(8, 16, 2, 10, 0.2)
    use = cpu_kernels.use_kernel
    assert use(x, w, dropped) and use(x, w, None)
    assert not use(x.double(), w.double(), dropped)  # fp64: the tests' reference dtype
    assert not use(x.t().contiguous().t(), w, dropped)  # a strided x
    assert not use(x, w.t().contiguous().t(), dropped)  # a strided w
    assert not use(x, w, torch.zeros(8, 16, dtype=torch.bool))  # a mask (other devices)
    assert not use(x.requires_grad_(), w, dropped)  # grad mode with a graph to keep
    monkeypatch.setattr(cpu_kernels, "MIN_MACS", 10**9)  # decode-sized products
    assert not use(x.detach(), w, dropped)


def test_the_op_rejects_what_it_cannot_compute():
    x, w, gh_t, dropped = operands(8, 16, 2, 10, 0.2)
    with pytest.raises(RuntimeError, match="float32 only"):
        ops().adapter_in_forward(x.double(), w.double(), 2, dropped)
    with pytest.raises(RuntimeError, match="n_clean"):
        ops().adapter_in_forward(x, w, 11, dropped)
    with pytest.raises(RuntimeError, match="gh_t"):
        ops().adapter_in_backward(x, w, 2, dropped, gh_t.t(), True, True)
    for bad in (dropped.flip(0), dropped + x.numel(), dropped - dropped[0] - 1):
        with pytest.raises(RuntimeError, match="sorted positions inside"):
            ops().adapter_in_forward(x, w, 2, bad)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_the_kernels_share_torchs_openmp_runtime():
    """Built with -fopenmp, the library must bind to the libgomp torch already loaded, not
    bring a second OpenMP runtime (two thread pools would fight over the cores)."""
    ops()
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line}
    assert len(runtimes) <= 1, runtimes


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "BUILD_NAME", "loramoe_cpu_broken_test")
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "MIN_MACS", 0)
    x, w, gh_t, dropped = operands(8, 16, 2, 10, 0.2)
    with pytest.warns(RuntimeWarning, match="CPU kernels are unavailable"):
        h_t = input_forward(x, w, 2, dropped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second attempt, no second warning
        grad_x, grad_w = input_backward(x, w, 2, dropped, gh_t, True, True)
    want = reference(x, w, 2, dropped, gh_t)
    for name, got, expected in zip(["h_t", "grad_x", "grad_w"], [h_t, grad_x, grad_w], want,
                                   strict=True):
        assert_close32(got, expected, name)


def test_fp32_output_through_onednn_and_the_kernels_can_be_modified_in_place(monkeypatch):
    """The fp32 route writes the output with oneDNN and reshapes it; it must still be a
    tensor of its own (autograd forbids in-place changes to views made inside a Function)."""
    from loramoe import thin_gemm

    monkeypatch.setattr(cpu_kernels, "MIN_MACS", 0)
    monkeypatch.setattr(thin_gemm, "MIN_MACS", 0)
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 5, 12, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    assert out.shape == (2, 5, 20) and out._base is None
    out.mul_(2.0)
    (grad_x,) = torch.autograd.grad(out.square().sum(), [x])
    torch.manual_seed(1)  # the same dropped positions
    want = layer.reference_forward(x.reshape(-1, 12))[0] * 2.0
    (want_grad_x,) = torch.autograd.grad(want.square().sum(), [x])
    torch.testing.assert_close(out.reshape(-1, 20), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_x, want_grad_x, rtol=1e-4, atol=1e-3)
