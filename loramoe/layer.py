"""LoRAMoELinear: a frozen linear layer plus a router over N stacked LoRA experts.

    o = W0·x + (alpha/r) · Σ_i ω_i(x) · B_i A_i dropout(x),    ω = softmax(x·Wgᵀ)

The N experts are stored stacked, A as (N, r, d_in) and B as (N, d_out, r), so all of them
cost two thin matrix products: x·[A_1;…;A_N]ᵀ gives every expert's r-dim code at once, the
router weights scale each expert's block of that code, and one product with [B_1 … B_N]
sums the experts. No Python loop over experts runs at training or inference time.

Two forward paths compute the same thing. The fused one (fused.py: one autograd node with a
hand-written backward) runs whenever base, input and adapters share one float32/64 dtype;
reference_forward, the formula under plain autograd, covers the rest (a bf16/fp16 base,
autocast, hooks on the base layer) and is what the tests check the fused path against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loramoe.config import LoRAMoEConfig
from loramoe.dropout import ExpertDropout, dropped_copy
from loramoe.fused import FusedLoRAMoE, stacked_B

try:  # GPT-2 style layers store the weight transposed: (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None

ADAPTER_PARAM_NAMES = ("router_weight", "lora_A", "lora_B")


def dense_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # exp / sum by hand: torch's softmax kernel is slower over a last dim of 6-16 experts.
    # Out of place, so reference_forward can differentiate it.
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # (M, N)
    probs = e / e.sum(dim=-1, keepdim=True)
    return probs, probs


def mix(codes: torch.Tensor, scaled_gates: torch.Tensor) -> torch.Tensor:
    """Each expert's r-dim code times its gate (already times the scale): (M, N*r)."""
    m, n = scaled_gates.shape
    return (codes.reshape(m, n, -1) * scaled_gates.unsqueeze(-1)).view(m, -1)  # (M, N*r)


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D is not None and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    raise TypeError(
        f"LoRAMoE wraps nn.Linear or transformers Conv1D layers, got {type(module).__name__}"
    )


class LoRAMoELinear(nn.Module):
    """Wraps a frozen ``base_layer`` (nn.Linear or Conv1D) with a LoRA mixture of experts.

    Router and experts are float32 whatever the base dtype, so a bf16/fp16 backbone trains
    stable adapters; the adapter output is cast back to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, config: LoRAMoEConfig) -> None:
        super().__init__()
        d_in, d_out = in_out_features(base_layer)
        self.base_layer = base_layer
        for param in self.base_layer.parameters():
            param.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.rank = config.num_experts, config.rank
        self.scaling = config.scaling
        self.top_k = config.top_k
        device = base_layer.weight.device
        n, r = self.num_experts, self.rank
        self.router_weight = nn.Parameter(torch.empty(n, d_in, device=device))
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in, device=device))
        self.lora_B = nn.Parameter(torch.empty(n, d_out, r, device=device))
        self.dropout = ExpertDropout(config.dropout)
        self.reset_parameters()
        # Router probabilities of the last forward, (*lead, N). Overwritten, never appended,
        # so many forwards (or generate) do not grow memory.
        self.router_probs: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Kaiming-uniform per expert as nn.Linear/PEFT do: fan_in must be d_in, so init the
        # (N*r, d_in) view rather than the 3-d tensor (whose fan_in would be r*d_in).
        nn.init.kaiming_uniform_(self.lora_A.view(-1, self.in_features), a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)  # B = 0: a fresh model computes exactly the base model

    def expert_weights(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """The live parameters (router_weight [N, d_in], A [N, r, d_in], B [N, d_out, r])."""
        return self.router_weight, self.lora_A, self.lora_B

    def route(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities and the gates the experts are mixed with, both (M, N)."""
        # At least fp32 whatever the base dtype: a bf16 softmax over experts is too coarse.
        dtype = torch.promote_types(x2d.dtype, torch.float32)
        return self.gates_from_logits(F.linear(x2d.to(dtype), self.router_weight.to(dtype)))

    @property
    def dense(self) -> bool:
        return self.top_k is None or self.top_k == self.num_experts

    def gates_from_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over experts; with top_k the gates keep the k largest, renormalised.

        The probabilities stay dense so a balancing loss sees (and trains) every router row.
        """
        if self.dense:
            return dense_softmax(logits)
        probs = logits.softmax(dim=-1)  # (M, N)
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)  # (M, k)
        top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)  # (M, N)
        return probs, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.can_fuse(x):
            out, probs = self.fused_forward(x)  # takes any leading dims
        else:
            lead = x.shape[:-1]
            out, probs = self.reference_forward(x.reshape(-1, self.in_features))
            out, probs = out.view(*lead, self.out_features), probs.view(*lead, self.num_experts)
        self.router_probs = probs  # (*lead, N)
        return out

    def can_fuse(self, x: torch.Tensor) -> bool:
        """The fused node (fused.py) covers one float32/64 dtype and a plain frozen base."""
        base, weight = self.base_layer, self.base_layer.weight
        return (
            x.dtype == weight.dtype == self.lora_A.dtype
            and x.dtype in (torch.float32, torch.float64)
            and not weight.requires_grad
            and not (base.bias is not None and base.bias.requires_grad)
            and not base._forward_hooks and not base._forward_pre_hooks
            and not torch.is_autocast_enabled(x.device.type)
        )

    def fused_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused node on x (..., d_in): out (..., d_out) and probs (..., N)."""
        dropped, keep_scale = self.dropout(x)
        weight = self.base_layer.weight
        weight_t = weight.t() if isinstance(self.base_layer, nn.Linear) else weight  # (d_in, d_out)
        return FusedLoRAMoE.apply(
            x, self.router_weight, self.lora_A, self.lora_B, weight_t, self.base_layer.bias,
            None if self.dense else self.gates_from_logits, self.scaling * keep_scale, dropped,
        )

    def reference_forward(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The formula under plain autograd: any base dtype, autocast, hooks on the base."""
        n, r = self.num_experts, self.rank
        # The base runs on the 2-d input so its output is a fresh tensor, not a view: the
        # in-place accumulation below then costs autograd nothing (on a view it would add
        # a CopySlices node: full-size copies in backward).
        base2d = self.base_layer(x2d)  # (M, d_out)
        probs, gates = self.route(x2d)
        adapter_dtype = self.lora_A.dtype
        dropped, keep_scale = self.dropout(x2d)
        xa = dropped_copy(x2d.to(adapter_dtype), dropped)  # (M, d_in)
        codes = F.linear(xa, self.lora_A.view(n * r, self.in_features))  # (M, N*r)
        # alpha/r and dropout's 1/keep go on the (M, N) gates, not on an (M, d) tensor.
        mixed = mix(codes, gates.to(adapter_dtype) * (self.scaling * keep_scale))  # (M, N*r)
        if base2d.dtype == adapter_dtype:
            # Accumulate into the base output inside the GEMM: no extra (M, d_out) pass.
            # Safe for autograd: Linear/Conv1D do not save their output for backward.
            return base2d.addmm_(mixed, stacked_B(self.lora_B)), probs
        return base2d + (mixed @ stacked_B(self.lora_B)).to(base2d.dtype), probs

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling}, "
            f"top_k={self.top_k}"
        )
