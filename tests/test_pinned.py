"""The whole plugged model and its LBC against an independent fp64 reference written here
in numpy: Eq. 5 per layer (o = W0·x + b + (α/r)·Σ_i softmax(x·Wgᵀ)_i · B_i·A_i·x) and the
LBC (Q summed over real tokens, Z = I∘Q, var/mean² with the unbiased variance, averaged over
layers), with random non-zero adapters. Nothing here calls the code under test to get the
expected numbers."""

from __future__ import annotations

import copy

import numpy as np
import torch
from conftest import VOCAB, fill_adapters, make_tiny_llama
from torch import nn

from loramoe import LoRAMoEConfig, apply_loramoe, collect_router_probs, localized_balancing_loss
from loramoe.injection import loramoe_layers


class NumpyReference(nn.Module):
    """One LoRAMoE layer as Eq. 5 in numpy fp64; keeps the router probabilities it saw."""

    def __init__(self, layer) -> None:
        super().__init__()
        as_np = lambda t: t.detach().double().numpy().copy()  # noqa: E731
        self.w0 = as_np(layer.base_layer.weight)  # (d_out, d_in)
        bias = layer.base_layer.bias
        self.b = as_np(bias) if bias is not None else 0.0
        self.wg, self.a, self.bm = (as_np(p) for p in layer.expert_weights())
        self.scale = layer.scaling
        self.probs: np.ndarray | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().numpy()  # (B, T, d_in)
        logits = xs @ self.wg.T  # (B, T, N)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)  # (B, T, N)
        self.probs = probs
        out = xs @ self.w0.T + self.b  # (B, T, d_out)
        for i in range(self.a.shape[0]):
            expert = (xs @ self.a[i].T) @ self.bm[i].T  # (B, T, d_out)
            out = out + self.scale * probs[..., i:i + 1] * expert
        return torch.from_numpy(out)


def reference_lbc(probs: list[np.ndarray], mask: np.ndarray, sample_types: list[int],
                  expert_types: list[int], delta: float) -> float:
    per_layer = []
    for p in probs:  # (B, T, N) per layer
        batch, _, n_experts = p.shape
        z = np.zeros((n_experts, batch))
        for n in range(n_experts):
            for m in range(batch):
                q = sum(p[m, t, n] for t in range(p.shape[1]) if mask[m, t])
                coeff = 1 + delta if expert_types[n] == sample_types[m] else 1 - delta
                z[n, m] = coeff * q
        per_layer.append(z.var(ddof=1) / z.mean() ** 2)
    return float(np.mean(per_layer))


def test_plugged_model_and_lbc_match_an_independent_fp64_reference():
    plugged = apply_loramoe(make_tiny_llama(), LoRAMoEConfig(dropout=0.0))
    fill_adapters(plugged, seed=7, scale=0.3)
    plugged.double()  # adapters too (they are created fp32 whatever the base dtype)
    reference = copy.deepcopy(plugged)
    refs = {}
    for name, layer in loramoe_layers(reference):
        parent, _, child = name.rpartition(".")
        refs[name] = NumpyReference(layer)
        setattr(reference.get_submodule(parent), child, refs[name])
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(11))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        got = plugged(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():  # the adapters must matter, or the comparison proves nothing
        base = make_tiny_llama().double()(input_ids=ids, attention_mask=mask).logits
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    expert_types = plugged.loramoe_config.expert_type_ids()
    lbc = localized_balancing_loss(collect_router_probs(plugged), mask, torch.tensor([0, 1]),
                                   expert_types, 0.1)
    names = [name for name, _ in loramoe_layers(plugged)]
    want_lbc = reference_lbc([refs[n].probs for n in names], mask.numpy(), [0, 1],
                             expert_types, 0.1)
    assert want_lbc > 0
    assert abs(lbc.item() - want_lbc) <= 1e-12 * max(1.0, want_lbc)
