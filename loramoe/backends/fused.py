"""One autograd node for a whole LoRAMoE layer: frozen base + router + stacked experts.

Autograd on the formula (LoRAMoELinear.formula) records about fifteen nodes per layer and,
in backward, materialises the input gradient three times (through the base, the router and
the experts) before summing them. This Function computes the same values with one node
whose backward is written out, in public torch ops. With Win = [Wg; A] (N + N·r, d_in), the
router and expert-input weights stacked, and hᵀ = Win·xᵀ = [logits; codes]ᵀ (experts-major):

    out             = mixed·B (+ b)  then  += x·W0ᵀ (the base's GEMM accumulates, beta = 1)
    grad_x          = grad_h·Win  then  += g·W0   (the base's GEMM accumulates, beta = 1)
    grad_Wg, grad_A = grad_hᵀ·x
    grad_B = mixedᵀ·g,   grad_mixed = g·Bᵀ        (the two thin GEMMs any LoRA pays)

Expert dropout arrives as the flat positions it zeroes (dropout.py: drawing those is what
pays most, docs/benchmarks.md): the router reads x, the experts dropout(x), a copy rebuilt
in backward rather than kept alive.

FusedBackend hands the node the layers it covers: CPU or CUDA, input in the base's dtype
(fp32, fp64, or bf16 with fp32 adapters: the products with x and the output then run in
bf16, the gating in fp32, the gradients land in fp32), a frozen nn.Linear/Conv1D base
without hooks, no autocast. Anything else (fp16, autocast, hooked bases, other devices) runs
the formula; the tests check the two against each other. On a GPU it saves 13 % of a ~1B
model's whole train step and 35 % of its peak memory against the formula (H200,
docs/benchmarks.md §4): the formula casts x to fp32 for the adapters and keeps that copy
and its dropped twin for backward; the node keeps bf16 x and a 1-byte mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loramoe.backends.dropout import draw_dropped, dropped_copy, zero_dropped_

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DEVICES = ("cpu", "cuda")  # where the node is measured to pay (docs/benchmarks.md §0, §4)


class FusedLoRAMoE(torch.autograd.Function):
    """out = x·W0ᵀ + b + scale·Σ_i gate_i(x)·B_i A_i drop(x), and the router probabilities.

    Inputs: x (..., d_in); router_weight (N, d_in); lora_A (N, r, d_in); lora_B (N, d_out, r);
    base_weight_t, the frozen base weight seen as (d_in, d_out); base_bias (d_out) or None;
    route: logits (M, N) -> (probs, gates), None meaning a dense softmax (gates = probs);
    scale: alpha/r times dropout's 1/keep; dropped: see dropout.py, or None.
    Returns out (..., d_out) and probs (..., N); probs stays differentiable for the LBC.
    Leading dimensions are flattened inside, so they cost no view nodes in the graph; out
    is a tensor of its own (not a view), so callers may still modify it in place.

    Inside, the per-token adapter tensors are kept experts-major, (N, M) and (N*r, M): the
    products come out that way at the same cost, softmax and its backward over the expert
    dimension then run as one fast kernel each (over a trailing dim of 6 they are ≈ 15× slower
    or five separate ops), and every thin GEMM reads a contiguous operand (no transposed
    copies). probs is returned as a view with the experts last.
    """

    @staticmethod
    def forward(ctx, x, router_weight, lora_A, lora_B, base_weight_t, base_bias,
                route: Router | None, scale: float, dropped: torch.Tensor | None):
        n, r, d_in = lora_A.shape
        lead, d_out = x.shape[:-1], base_weight_t.shape[1]
        x2d = x.reshape(-1, d_in)  # (M, d_in)
        m = x2d.shape[0]
        # The products with x and the output run in x's dtype (bf16 on a bf16 base, where
        # the weights are cast, a few KB); the (N, M)-sized gating math in the adapters'.
        a2d = lora_A.view(n * r, d_in)  # (N*r, d_in)
        b_stacked = stacked_B(lora_B).to(x.dtype)  # (N*r, d_out)
        in_weight = torch.cat([router_weight, a2d]).to(x.dtype)  # (N+N*r, d_in)
        h_t = input_forward(x2d, in_weight, n, dropped).to(lora_A.dtype)  # (N+N*r, M)
        logits_t, codes_t = h_t[:n], h_t[n:]  # (N, M), (N*r, M): contiguous row blocks
        if route is None:
            probs_t = gates_t = torch.softmax(logits_t, dim=0)  # (N, M)
        else:
            probs, gates = route(logits_t.t())  # (M, N) each
            probs_t, gates_t = probs.t(), gates.t()  # (N, M) views
        mixed_t = (codes_t.view(n, r, m) * gates_t.unsqueeze(1)).view(n * r, m)  # (N*r, M)
        # The adapter's output (+ the base's bias) first, into a fresh tensor; the base's GEMM
        # then accumulates x·W0ᵀ onto it (beta = 1) instead of an extra pass over the output.
        out = _mm((mixed_t * scale).t().to(x.dtype), b_stacked, base_bias)  # (M, d_out)
        out.addmm_(x2d, base_weight_t)
        # resize_, not view: a view made inside a custom Function may not be modified in place
        # by the model later; this only reshapes a fresh contiguous tensor.
        out.resize_(*lead, d_out)  # (..., d_out)

        ctx.route, ctx.scale, ctx.x_shape = route, scale, x.shape
        ctx.has_dropped = dropped is not None
        # The (N*r, M)-sized tensors are kept rather than rebuilt in backward.
        ctx.save_for_backward(x2d, in_weight, b_stacked, base_weight_t,
                              logits_t, codes_t, probs_t, gates_t, mixed_t,
                              *([dropped] if dropped is not None else []))
        ctx.set_materialize_grads(False)
        return out, probs_t.t().view(*lead, n)

    @staticmethod
    def backward(ctx, grad_out, grad_probs):
        (x2d, in_weight, b_stacked, base_weight_t, logits_t, codes_t, probs_t, gates_t,
         mixed_t, *rest) = ctx.saved_tensors
        dropped = rest[0] if ctx.has_dropped else None
        n, m = probs_t.shape
        r, scale = codes_t.shape[0] // n, ctx.scale
        d_out, low, high = b_stacked.shape[1], x2d.dtype, codes_t.dtype  # compute, adapters
        if grad_out is None:
            grad_out = mixed_t.new_zeros(m, d_out)
        grad_out = grad_out.reshape(m, d_out)  # (M, d_out)
        if grad_probs is not None:
            grad_probs = grad_probs.reshape(m, n)  # (M, N)

        grad_B = None
        if ctx.needs_input_grad[3]:  # next to grad_mixed: both read grad_out, which is large
            grad_B_t = _mm(mixed_t.to(low), grad_out).view(n, r, -1)  # (N, r, d_out)
            # Scaled straight into the parameter's (N, d_out, r) layout and dtype: one pass,
            # and autograd can keep this tensor as .grad without another copy.
            grad_B = torch.mul(grad_B_t.transpose(1, 2), scale,
                               out=torch.empty(n, d_out, r, dtype=high, device=grad_out.device))
        grad_mixed = _mm(b_stacked, grad_out.t()).to(high).mul_(scale).view(n, r, m)  # (N,r,M)
        grad_gates_t = (grad_mixed * codes_t.view(n, r, m)).sum(1)  # (N, M)
        grad_codes_t = grad_mixed.mul_(gates_t.unsqueeze(1)).view(n * r, m)  # (N*r, M)
        grad_logits_t = gating_backward(ctx.route, logits_t, probs_t, grad_gates_t, grad_probs)

        grad_h_t = torch.cat([grad_logits_t, grad_codes_t]).to(low)  # (N+N*r, M)
        # The adapter's share of grad_x (the experts' through the dropout mask) and the
        # gradient of [Wg; A].
        grad_x, grad_in_weight = input_backward(
            x2d, in_weight, n, dropped, grad_h_t, need_grad_x=ctx.needs_input_grad[0],
            need_grad_w=ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        grad_router = grad_A = None
        if grad_in_weight is not None:
            grad_in_weight = grad_in_weight.to(high)
            grad_router = grad_in_weight[:n]  # (N, d_in)
            grad_A = grad_in_weight[n:].view(n, r, -1)  # (N, r, d_in)
        if grad_x is not None:
            # += the frozen base's backward g·W0, accumulated inside the GEMM (beta = 1)
            grad_x = grad_x.addmm_(grad_out, base_weight_t.t()).view(ctx.x_shape)  # (..., d_in)
        return grad_x, grad_router, grad_A, grad_B, None, None, None, None, None


def gating_backward(route: Router | None, logits_t, probs_t, grad_gates_t, grad_probs):
    """d loss / d logits as (N, M), given the loss's gradients w.r.t. the gates ((N, M)) and
    the probabilities ((M, N), as the caller of the node sees them, or None)."""
    if route is None:  # gates = probs = softmax(logits) over the experts (dim 0 here)
        grad_t = grad_gates_t if grad_probs is None else grad_gates_t + grad_probs.t()  # (N, M)
        # softmax's backward over the experts (dim 0): probs ∘ (g - Σ_n probs·g)
        return probs_t * (grad_t - (probs_t * grad_t).sum(0, keepdim=True))  # (N, M)
    with torch.enable_grad():  # any other gating: re-run the (M, N) op and differentiate it
        logits_ = logits_t.t().detach().requires_grad_(True)  # (M, N)
        probs_, gates_ = route(logits_)
        outputs, grads = [gates_], [grad_gates_t.t()]
        if grad_probs is not None:
            outputs, grads = [gates_, probs_], [grad_gates_t.t(), grad_probs]
        (grad_logits,) = torch.autograd.grad(outputs, logits_, grads)
    return grad_logits.t()  # (N, M)


def stacked_B(lora_B: torch.Tensor) -> torch.Tensor:
    """[B_1 … B_N] as one (N*r, d_out) matrix, so one GEMM sums every expert."""
    n, d_out, r = lora_B.shape
    return lora_B.transpose(1, 2).reshape(n * r, d_out)  # (N*r, d_out)


def covers(layer, x: torch.Tensor, devices: tuple[str, ...] = DEVICES) -> bool:
    """The node covers inputs on `devices` in the base's dtype (fp32, fp64 or bf16, with
    adapters in fp32 or wider) on a plain frozen base."""
    base, weight = layer.base_layer, layer.base_layer.weight
    return (
        x.device.type in devices
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.float64, torch.bfloat16)
        and layer.lora_A.dtype == torch.promote_types(x.dtype, torch.float32)
        and not weight.requires_grad
        and not (base.bias is not None and base.bias.requires_grad)
        and not base._forward_hooks and not base._forward_pre_hooks
        and not torch.is_autocast_enabled(x.device.type)
    )


class FusedBackend:
    """backend(layer, x): the fused node, or None where it does not apply (the formula runs).

    `devices`: where it runs (DEVICES by default).
    """

    name = "fused"

    def __init__(self, devices: tuple[str, ...] = DEVICES) -> None:
        self.devices = devices

    def __call__(self, layer, x: torch.Tensor):
        if not covers(layer, x, self.devices):
            return None
        p = layer.dropout.p
        dropped, keep_scale = None, 1.0
        if layer.training and p > 0:
            keep_scale = 1.0 / (1.0 - p)
            dropped = draw_dropped(x.numel(), p, x.device)  # flat positions or mask
        weight = layer.base_layer.weight
        weight_t = weight.t() if isinstance(layer.base_layer, torch.nn.Linear) else weight
        return FusedLoRAMoE.apply(
            x, layer.router_weight, layer.lora_A, layer.lora_B, weight_t, layer.base_layer.bias,
            None if layer.dense else layer.gates_from_logits, layer.scaling * keep_scale,
            dropped,
        )


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias (P,)) for 2-d a (M, K) and b (K, P), either may be a transposed view."""
    return a.mm(b) if bias is None else torch.addmm(bias, a, b)


def input_forward(x2d: torch.Tensor, w: torch.Tensor, n_clean: int,
                  dropped: torch.Tensor | None) -> torch.Tensor:
    """h_t (P, M) = W·xᵀ, its rows from n_clean on (the experts') computed on dropout(x)."""
    if dropped is None:
        return _mm(w, x2d.t())  # (P, M)
    return torch.cat([_mm(w[:n_clean], x2d.t()),
                      _mm(w[n_clean:], dropped_copy(x2d, dropped).t())])  # (P, M)


def input_backward(x2d: torch.Tensor, w: torch.Tensor, n_clean: int,
                   dropped: torch.Tensor | None, gh_t: torch.Tensor, need_grad_x: bool,
                   need_grad_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Given gh_t (P, M), the gradient of h_t: the adapter's grad_x (M, d), a fresh tensor
    the caller may accumulate into, and grad_W (P, d); None for what is not needed."""
    grad_x = grad_w = None
    if dropped is None:
        if need_grad_x:
            grad_x = _mm(gh_t.t(), w)  # (M, d)
        if need_grad_w:
            grad_w = _mm(gh_t, x2d)  # (P, d)
        return grad_x, grad_w
    if need_grad_x:  # the experts' share passes back through the dropout mask
        grad_x = zero_dropped_(_mm(gh_t[n_clean:].t(), w[n_clean:]), dropped)  # (M, d)
        grad_x.addmm_(gh_t[:n_clean].t(), w[:n_clean])
    if need_grad_w:
        grad_w = torch.cat([_mm(gh_t[:n_clean], x2d),
                            _mm(gh_t[n_clean:], dropped_copy(x2d, dropped))])  # (P, d)
    return grad_x, grad_w
