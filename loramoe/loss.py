"""Balancing losses over LoRAMoE router probabilities.

localized_balancing_loss is the paper's LBC: per layer, with Q[n, m] the router weight of
expert n summed over the (non-padding) tokens of sample m and I[n, m] = 1 ± δ depending on
whether expert n's type matches sample m's task type,

    Z = I ∘ Q,        L_lbc = var(Z) / mean(Z)²      (squared coefficient of variation)

The paper's text says this should push each sample's weight towards experts of its own type.
Taken literally (form="paper") it does the opposite: L_lbc is zero when Z is uniform, i.e.
Q ∝ 1/I, where a sample gives the experts of its own type (1-δ)/(1+δ) times the weight of the
others (docs/method.md; tests/test_loss.py pins the direction). The official code computes the
same formula. form="aligned" divides instead, Z = Q ⊘ I: zero when Q ∝ I, i.e. own-type
experts get (1+δ)/(1−δ) times the weight of the others, as the paper's text intends. Within a
type the experts are kept balanced either way. load="mean" divides Q by each sample's token
count, so long samples do not dominate the variance. balance_loss is the type-blind cv² of
Shazeer et al. (2017).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

Reduction = Literal["mean", "sum"]
Form = Literal["paper", "aligned"]
Load = Literal["sum", "mean"]
FORMS, LOADS = ("paper", "aligned"), ("sum", "mean")


def _stack_layers(router_probs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(router_probs, torch.Tensor):
        probs = router_probs if router_probs.dim() == 4 else router_probs.unsqueeze(0)
    else:
        if len(router_probs) == 0:
            raise ValueError("router_probs is empty: the model has no LoRAMoE layers")
        probs = torch.stack(list(router_probs))  # (L, B, T, N)
    if probs.dim() != 4:
        raise ValueError(f"router_probs must be (B, T, N) per layer, got {tuple(probs.shape)}")
    # At least fp32 (bf16 sums over long sequences are too coarse), fp64 kept for tests.
    return probs.to(torch.promote_types(probs.dtype, torch.float32))


def _per_sample_load(probs: torch.Tensor, attention_mask: torch.Tensor | None,
                     load: Load = "sum") -> torch.Tensor:
    """Q: router weight per expert summed (load="mean": averaged) over each sample's real
    tokens, (L, N, B)."""
    if load not in LOADS:
        raise ValueError(f"load must be one of {list(LOADS)}, got {load!r}")
    n_layers, batch, seq, _ = probs.shape
    if attention_mask is None:
        total = probs.sum(dim=2).transpose(1, 2)  # (L, N, B)
        return total / seq if load == "mean" else total
    if attention_mask.shape != (batch, seq):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match router "
            f"probabilities (B, T) = {(batch, seq)}"
        )
    mask = attention_mask.to(probs.dtype)  # (B, T)
    total = torch.einsum("lbtn,bt->lnb", probs, mask)  # (L, N, B)
    return total / mask.sum(dim=1).clamp_min(1) if load == "mean" else total  # (L, N, B)


def _cv_squared(z: torch.Tensor) -> torch.Tensor:
    """var/mean² over the last two dims, per leading index; unbiased var like torch.var."""
    flat = z.flatten(start_dim=1)  # (L, N*B)
    if flat.shape[1] < 2:
        return flat.new_zeros(flat.shape[0])
    return flat.var(dim=1) / flat.mean(dim=1).pow(2).clamp_min(1e-12)  # (L,)


def _reduce(per_layer: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_layer.mean()
    if reduction == "sum":
        return per_layer.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def type_coefficients(
    sample_types: torch.Tensor, expert_types: torch.Tensor, delta: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """I[n, m] = 1+δ if expert n's type is sample m's, 1−δ if not, 1 for untyped (−1) samples."""
    sample_types = sample_types.view(1, -1)  # (1, B)
    expert_types = expert_types.view(-1, 1).to(sample_types.device)  # (N, 1)
    same = expert_types == sample_types  # (N, B)
    plus = torch.tensor(1.0 + delta, dtype=dtype, device=same.device)
    coeff = torch.where(same, plus, 1.0 - delta)  # (N, B)
    return torch.where(sample_types < 0, torch.ones_like(coeff), coeff)  # (N, B)


def localized_balancing_loss(
    router_probs: Sequence[torch.Tensor] | torch.Tensor,
    attention_mask: torch.Tensor | None,
    sample_types: torch.Tensor,
    expert_types: torch.Tensor | Sequence[int],
    delta: float = 0.1,
    reduction: Reduction = "mean",
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    form: Form = "paper",
    load: Load = "sum",
) -> torch.Tensor:
    """The LBC of LoRAMoE over every layer's (B, T, N) router probabilities.

    attention_mask (B, T): padding tokens do not count in Q. sample_types (B,) long: index of
    each sample's task type in the config's expert_types, −1 for untyped samples.
    expert_types (N,) long: type index of each expert. reduction "mean" averages the layers,
    "sum" adds them (as the official code does). form "paper": Z = I ∘ Q (the formula as
    published); "aligned": Z = Q ⊘ I (minimum where own-type experts get (1+δ)/(1−δ) times the
    others' weight). load "sum" (paper) or "mean" over each sample's tokens. gather, under
    data parallelism, joins Z (L, N, B) of every process along the samples, so the variance
    is the global batch's.
    """
    probs = _stack_layers(router_probs)  # (L, B, T, N)
    expert_types = torch.as_tensor(expert_types, dtype=torch.long, device=probs.device)
    sample_types = torch.as_tensor(sample_types, dtype=torch.long, device=probs.device)
    if expert_types.numel() != probs.shape[-1]:
        raise ValueError(
            f"expert_types has {expert_types.numel()} entries, router has {probs.shape[-1]} experts"
        )
    if sample_types.numel() != probs.shape[1]:
        raise ValueError(
            f"sample_types has {sample_types.numel()} entries, batch size is {probs.shape[1]}"
        )
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    if form == "aligned" and delta >= 1:
        raise ValueError(f"form='aligned' divides by 1 - delta: delta must be < 1, got {delta}")
    q = _per_sample_load(probs, attention_mask, load)  # Q: (L, N, B)
    coeff = type_coefficients(sample_types, expert_types, delta, q.dtype)  # I: (N, B)
    # paper: Z = I ∘ Q (L, N, B);  aligned: Z = Q ⊘ I (L, N, B)
    weighted = coeff.unsqueeze(0) * q if form == "paper" else q / coeff.unsqueeze(0)
    if gather is not None:
        weighted = gather(weighted)  # (L, N, B·processes)
    return _reduce(_cv_squared(weighted), reduction)


def balance_loss(
    router_probs: Sequence[torch.Tensor] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Type-blind importance balance (Shazeer et al.): cv² of each expert's summed weight."""
    return _reduce(_importance_cv_squared(router_probs, attention_mask), reduction)


def _importance_cv_squared(router_probs, attention_mask, total=None) -> torch.Tensor:
    """cv² per layer of each expert's router weight summed over the batch's real tokens
    (and, with `total`, over every process's batch)."""
    probs = _stack_layers(router_probs)  # (L, B, T, N)
    importance = _per_sample_load(probs, attention_mask).sum(dim=2)  # (L, N)
    if total is not None:
        importance = total(importance)  # (L, N), summed over processes
    return _cv_squared(importance)  # (L,)


def router_cv(router_probs: Sequence[torch.Tensor] | torch.Tensor,
              attention_mask: torch.Tensor | None = None,
              total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Coefficient of variation of per-expert importance, averaged over layers (paper Fig. 5).
    `total` sums the (L, N) importance over data-parallel processes, so the value is the
    global batch's, as one process would compute it."""
    with torch.no_grad():
        return _importance_cv_squared(router_probs, attention_mask, total).sqrt().mean()
