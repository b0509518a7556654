"""LoRAMoELinear: a frozen linear layer plus a router over N LoRA experts (Dou et al., Eq. 5).

    o = W0·x + (α/r) · Σ_i ω_i(x) · B_i A_i dropout(x),    ω(x) = softmax(Wg·x)

The N experts are stored stacked, A as (N, r, d_in) and B as (N, d_out, r), so `formula`
computes every expert with two einsums and no Python loop over experts.

`formula` is the layer's forward. A backend (loramoe/backends) may be attached as
``layer.backend``: a callable ``backend(layer, x)`` that returns the same (out, probs) faster,
or None when it does not cover the case, in which case the formula runs. This module imports
no backend; `apply_loramoe` attaches one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loramoe.config import LoRAMoEConfig

try:  # GPT-2 style layers store the weight transposed: (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None

ADAPTER_PARAM_NAMES = ("router_weight", "lora_A", "lora_B")

# backend(layer, x) -> (out, probs), or None: "not for this input, run the formula".
Backend = Callable[["LoRAMoELinear", torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


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
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.rank = config.num_experts, config.rank
        self.scaling = config.scaling  # alpha / r
        self.top_k = config.top_k
        device = base_layer.weight.device
        n, r = self.num_experts, self.rank
        self.router_weight = nn.Parameter(torch.empty(n, d_in, device=device))  # Wg
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in, device=device))
        self.lora_B = nn.Parameter(torch.empty(n, d_out, r, device=device))
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()
        self.backend: Backend | None = None
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.backend(self, x) if self.backend is not None else None
        out, self.router_probs = result if result is not None else self.formula(x)
        return out

    def formula(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 5 in plain torch ops: out (..., d_out) and the router probabilities (..., N)."""
        base = self.base_layer(x)  # (..., d_out)                        W0·x
        x = x.to(self.lora_A.dtype)  # the adapters compute in their own (fp32) dtype
        probs, gates = self.route(x)  # (..., N) each                     ω(x)
        codes = torch.einsum("...d,nrd->...nr", self.dropout(x), self.lora_A)  # (..., N, r)
        mixed = codes * (self.scaling * gates).unsqueeze(-1)  # (..., N, r)  (α/r)·ω_i·A_i x
        delta = torch.einsum("...nr,nor->...o", mixed, self.lora_B)  # (..., d_out)  Σ_i B_i·
        return base + delta.to(base.dtype), probs

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities and the gates the experts are mixed with, both (..., N)."""
        return self.gates_from_logits(F.linear(x, self.router_weight))

    @property
    def dense(self) -> bool:
        return self.top_k is None or self.top_k == self.num_experts

    def gates_from_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over experts; with top_k the gates keep the k largest, renormalised.

        The probabilities stay dense so a balancing loss sees (and trains) every router row.
        """
        probs = logits.softmax(dim=-1)  # (..., N)
        if self.dense:
            return probs, probs
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)  # (..., k)
        top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)  # (..., N)
        return probs, gates

    def extra_repr(self) -> str:
        backend = getattr(self.backend, "name", None) if self.backend is not None else "formula"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling}, "
            f"top_k={self.top_k}, backend={backend}"
        )
