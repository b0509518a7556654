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
_LANE_LEVELS = 1 << 15


def cpu_dropout_unscaled(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout mask applied to x, and the 1/keep-rate scale still to apply.

    The mask is cut from 15-bit lanes of int64 random words: torch's CPU bernoulli_ draws
    one random number per element and costs more than the whole adapter; this draws a
    quarter as many words (drop rate quantised to 1/32768). The scale is returned rather
    than applied so the caller can fold it into a tiny tensor (the router gates).
    """
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    lanes = words.view(torch.int16)[:n] & (_LANE_LEVELS - 1)  # uniform in [0, 2**15)
    threshold = round(p * _LANE_LEVELS)
    keep = (lanes >= threshold).view(x.shape)
    return torch.where(keep, x, 0.0), _LANE_LEVELS / (_LANE_LEVELS - threshold)


class ExpertDropout(nn.Module):
    """Dropout on the experts' input: the fast CPU mask on CPU, torch's kernel elsewhere.

    Returns (masked x, scale still to apply); inverted dropout is masked x times scale.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if not self.training or self.p == 0:
            return x, 1.0
        if x.device.type == "cpu":
            return cpu_dropout_unscaled(x, self.p)
        return F.dropout(x, self.p, training=True), 1.0

    def extra_repr(self) -> str:
        return f"p={self.p}"


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
        lead = x.shape[:-1]
        n, r = self.num_experts, self.rank
        x2d = x.reshape(-1, self.in_features)  # (M, d_in)
        # The base runs on the 2-d input so its output is a fresh tensor, not a view: the
        # in-place accumulation below then costs autograd nothing (on a view it would add
        # a CopySlices node: full-size copies in backward).
        base2d = self.base_layer(x2d)  # (M, d_out)
        probs, gates = self.route(x2d)
        self.router_probs = probs.view(*lead, n)  # (*lead, N)

        adapter_dtype = self.lora_A.dtype
        xa, dropout_scale = self.dropout(x2d.to(adapter_dtype))  # (M, d_in)
        codes = F.linear(xa, self.lora_A.view(n * r, self.in_features))  # (M, N*r)
        # Fold alpha/r (and dropout's 1/keep) into the gates: an (M, N) multiply instead
        # of an (M, d_out) or (M, d_in) one.
        gates = (gates * (self.scaling * dropout_scale)).to(adapter_dtype)  # (M, N)
        mixed = (codes.view(-1, n, r) * gates.unsqueeze(-1)).view(-1, n * r)  # (M, N*r)
        b_stack = self.lora_B.transpose(1, 2).reshape(n * r, self.out_features)  # (N*r, d_out)
        if base2d.dtype == adapter_dtype:
            # Accumulate into the base output inside the GEMM: no extra (M, d_out) pass.
            # Safe for autograd: Linear/Conv1D do not save their output for backward.
            out = base2d.addmm_(mixed, b_stack)  # (M, d_out)
        else:
            out = base2d + (mixed @ b_stack).to(base2d.dtype)  # (M, d_out)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling}, "
            f"top_k={self.top_k}"
        )
