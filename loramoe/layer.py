"""LoRAMoELinear: a frozen linear layer plus a router over N stacked LoRA experts.

    o = W0·x + (alpha/r) · Σ_i ω_i(x) · B_i A_i dropout(x),    ω = softmax(x·Wgᵀ)

The N experts are stored stacked, A as (N, r, d_in) and B as (N, d_out, r), so all of them
cost two thin matrix products: x·[A_1;…;A_N]ᵀ gives every expert's r-dim code at once, the
router weights scale each expert's block of that code, and one product with [B_1 … B_N]
sums the experts. No Python loop over experts runs at training or inference time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loramoe.config import LoRAMoEConfig

try:  # GPT-2 style layers store the weight transposed: (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None

ADAPTER_PARAM_NAMES = ("router_weight", "lora_A", "lora_B")


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
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
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
        """Router probabilities and the gates the experts are mixed with, both (M, N).

        With top_k the gates keep the k largest probabilities per token, renormalised; the
        probabilities stay dense so a balancing loss sees (and trains) every router row.
        """
        # At least fp32 whatever the base dtype: a bf16 softmax over experts is too coarse.
        dtype = torch.promote_types(x2d.dtype, torch.float32)
        logits = F.linear(x2d.to(dtype), self.router_weight.to(dtype))  # (M, N)
        probs = logits.softmax(dim=-1)  # (M, N)
        if self.top_k is None or self.top_k == self.num_experts:
            return probs, probs
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)  # (M, k)
        top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)  # (M, N)
        return probs, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (*lead, d_out)
        lead = x.shape[:-1]
        n, r = self.num_experts, self.rank
        x2d = x.reshape(-1, self.in_features)  # (M, d_in)
        probs, gates = self.route(x2d)
        self.router_probs = probs.view(*lead, n)  # (*lead, N)

        adapter_dtype = self.lora_A.dtype
        xa = self.dropout(x2d.to(adapter_dtype))  # (M, d_in)
        codes = F.linear(xa, self.lora_A.view(n * r, self.in_features))  # (M, N*r)
        # Fold alpha/r into the gates: an (M, N) multiply instead of an (M, d_out) one.
        gates = (gates * self.scaling).to(adapter_dtype)  # (M, N)
        mixed = (codes.view(-1, n, r) * gates.unsqueeze(-1)).view(-1, n * r)  # (M, N*r)
        b_stack = self.lora_B.transpose(1, 2).reshape(n * r, self.out_features)  # (N*r, d_out)
        base2d = result.reshape(-1, self.out_features)  # (M, d_out)
        if base2d.dtype == adapter_dtype:
            # addmm fuses "base + adapter" into the GEMM: no extra (M, d_out) pass.
            out = torch.addmm(base2d, mixed, b_stack)  # (M, d_out)
        else:
            out = base2d + (mixed @ b_stack).to(base2d.dtype)  # (M, d_out)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling}, "
            f"top_k={self.top_k}"
        )
