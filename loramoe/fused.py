"""One autograd node for a whole LoRAMoE layer: frozen base + router + stacked experts.

Autograd on the plain formula (LoRAMoELinear.reference_forward) records about fifteen nodes
per layer and, in backward, materialises the input gradient three times (through the base,
the router and the experts) before summing them. This Function computes the same values with
one node whose backward is written out. With Win = [Wg; A] (N + N·r, d_in), the router and
expert-input weights stacked, and h = x·Winᵀ = [logits | codes]:

    grad_x        = g·W0  then  += grad_h·Win     (in place, inside the GEMM)
    grad_Wg, grad_A = grad_hᵀ·x                   (one GEMM)
    grad_B        = mixedᵀ·g,   grad_mixed = g·Bᵀ  (the two thin GEMMs any LoRA pays)

Expert dropout arrives as the positions it zeroes (dropout.py); the dropped copy of the
input is rebuilt in backward rather than kept alive between the passes.

LoRAMoELinear uses it when base, input and adapters share one float32/float64 dtype and the
base is a frozen nn.Linear/Conv1D without hooks; anything else (bf16 bases, autocast, hooked
bases) takes the plain autograd path, and the tests check the two against each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loramoe.dropout import zero_dropped_
from loramoe.thin_gemm import thin_mm

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class FusedLoRAMoE(torch.autograd.Function):
    """out = x·W0ᵀ + b + scale·Σ_i gate_i(x)·B_i A_i drop(x), and the router probabilities.

    Inputs: x2d (M, d_in); router_weight (N, d_in); lora_A (N, r, d_in); lora_B (N, d_out, r);
    base_weight_t, the frozen base weight seen as (d_in, d_out); base_bias (d_out) or None;
    route: logits (M, N) -> (probs, gates), None meaning a dense softmax (gates = probs);
    scale: alpha/r times dropout's 1/keep; dropped: see dropout.py, or None.
    Returns out (M, d_out) and probs (M, N); probs stays differentiable for the LBC.
    """

    @staticmethod
    def forward(ctx, x2d, router_weight, lora_A, lora_B, base_weight_t, base_bias,
                route: Router | None, scale: float, dropped: torch.Tensor | None):
        n, r, d_in = lora_A.shape
        in_weight = torch.cat([router_weight, lora_A.reshape(n * r, d_in)])  # (N+N*r, d_in)
        b_stacked = stacked_B(lora_B)  # (N*r, d_out)
        if base_bias is None:
            out = x2d.mm(base_weight_t)  # (M, d_out)
        else:
            out = torch.addmm(base_bias, x2d, base_weight_t)  # (M, d_out)
        if dropped is None:  # router and experts read the same input: one GEMM for both
            h = thin_mm(x2d, in_weight.t())  # (M, N+N*r) = [logits | codes]
            logits, codes = h[:, :n], h[:, n:]  # (M, N), (M, N*r)
        else:
            logits = thin_mm(x2d, router_weight.t())  # (M, N)
            codes = thin_mm(dropped_copy(x2d, dropped), in_weight[n:].t())  # (M, N*r)
        probs, gates = dense_softmax(logits) if route is None else route(logits)
        scaled_gates = gates * scale  # (M, N)
        mixed = mix(codes, scaled_gates)  # (M, N*r)
        out.addmm_(mixed, b_stacked)  # (M, d_out), summed inside the GEMM

        ctx.route, ctx.scale, ctx.rank = route, scale, r
        ctx.has_dropped = dropped is not None
        # mixed and the gates are (M, 30)-sized: kept rather than rebuilt in backward.
        ctx.save_for_backward(x2d, in_weight, b_stacked, base_weight_t, logits, codes, probs,
                              scaled_gates, mixed, *([dropped] if dropped is not None else []))
        ctx.set_materialize_grads(False)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, grad_probs):
        (x2d, in_weight, b_stacked, base_weight_t, logits, codes, probs, scaled_gates, mixed,
         *rest) = ctx.saved_tensors
        dropped = rest[0] if ctx.has_dropped else None
        m, n = probs.shape
        r, scale = ctx.rank, ctx.scale
        if grad_out is None:
            grad_out = mixed.new_zeros(m, b_stacked.shape[1])

        grad_B = None
        if ctx.needs_input_grad[3]:  # next to grad_mixed: both read grad_out, which is large
            grad_B = thin_mm(mixed.t(), grad_out).view(n, r, -1).transpose(1, 2)  # (N, d_out, r)
        grad_mixed = thin_mm(grad_out, b_stacked.t()).view(m, n, r)  # (M, N, r)
        grad_gates = (grad_mixed * codes.view(m, n, r)).sum(-1).mul_(scale)  # (M, N)
        grad_codes = grad_mixed.mul_(scaled_gates.unsqueeze(-1)).view(m, n * r)  # (M, N*r)
        grad_logits = gating_backward(ctx.route, logits, probs, grad_gates, grad_probs)

        grad_x = grad_router = grad_A = None
        if dropped is None:
            grad_h = torch.cat([grad_logits, grad_codes], dim=1)  # (M, N+N*r)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.mm(base_weight_t.t())  # (M, d_in): the frozen base's backward
            if dropped is None:
                grad_x.addmm_(grad_h, in_weight)
            else:  # the experts' share passes back through the dropout mask
                grad_x.addmm_(grad_logits, in_weight[:n])
                grad_x.add_(zero_dropped_(thin_mm(grad_codes, in_weight[n:]), dropped))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if dropped is None:
                grad_in_weight = thin_mm(grad_h.t(), x2d)  # (N+N*r, d_in)
                grad_router, grad_A = grad_in_weight[:n], grad_in_weight[n:]
            else:
                grad_router = thin_mm(grad_logits.t(), x2d)  # (N, d_in)
                grad_A = thin_mm(grad_codes.t(), dropped_copy(x2d, dropped))  # (N*r, d_in)
            grad_A = grad_A.view(n, r, -1)  # (N, r, d_in)
        return grad_x, grad_router, grad_A, grad_B, None, None, None, None, None


def dense_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # exp / sum by hand: torch's softmax kernel is slower over a last dim of 6-16 experts.
    # Out of place, so the reference path can differentiate it.
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # (M, N)
    probs = e / e.sum(dim=-1, keepdim=True)
    return probs, probs


def gating_backward(route: Router | None, logits, probs, grad_gates, grad_probs):
    """d loss / d logits, given the loss's gradients w.r.t. the gates and the probabilities."""
    if route is None:  # gates = probs = softmax(logits): the softmax backward by hand
        grad = grad_gates if grad_probs is None else grad_gates + grad_probs  # (M, N)
        return probs * (grad - (grad * probs).sum(dim=-1, keepdim=True))
    with torch.enable_grad():  # any other gating: re-run the (M, N) op and differentiate it
        logits_ = logits.detach().requires_grad_(True)
        probs_, gates_ = route(logits_)
        outputs, grads = [gates_], [grad_gates]
        if grad_probs is not None:
            outputs, grads = [gates_, probs_], [grad_gates, grad_probs]
        (grad_logits,) = torch.autograd.grad(outputs, logits_, grads)
    return grad_logits


def dropped_copy(x2d: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
    """The experts' input: x with the dropped positions zeroed (x itself without dropout)."""
    if dropped is None:
        return x2d
    return zero_dropped_(x2d.clone(memory_format=torch.contiguous_format), dropped)


def stacked_B(lora_B: torch.Tensor) -> torch.Tensor:
    """[B_1 … B_N] as one (N*r, d_out) matrix, so one GEMM sums every expert."""
    n, d_out, r = lora_B.shape
    return lora_B.transpose(1, 2).reshape(n * r, d_out)  # (N*r, d_out)


def mix(codes: torch.Tensor, scaled_gates: torch.Tensor) -> torch.Tensor:
    """Each expert's r-dim code times its gate (already times the scale): (M, N*r)."""
    m, n = scaled_gates.shape
    return (codes.reshape(m, n, -1) * scaled_gates.unsqueeze(-1)).view(m, -1)  # (M, N*r)
