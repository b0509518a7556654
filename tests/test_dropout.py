"""Expert dropout drawn as positions: the same law as independent Bernoulli(p) per element."""

from __future__ import annotations

import math

import pytest
import torch

from loramoe.backends.dropout import bernoulli_positions, dropped_copy, zero_dropped_


def as_mask(positions: torch.Tensor, numel: int) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    return mask


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("chunk", [None, 5])  # 5: many top-up rounds of the gap draw
def test_positions_are_iid_bernoulli(p, chunk):
    torch.manual_seed(0)
    numel = 400_000 if chunk is None else 20_000
    positions = bernoulli_positions(numel, p, chunk=chunk)
    assert positions.dtype == torch.int64
    assert (positions.diff() > 0).all() and positions[0] >= 0 and positions[-1] < numel
    mask = as_mask(positions, numel).double()
    sd = math.sqrt(p * (1 - p) / numel)
    assert abs(mask.mean().item() - p) < 5 * sd
    # Independence: neighbours (and elements 7 apart) are both dropped at rate p².
    for lag in (1, 7):
        both = (mask[:-lag] * mask[lag:]).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / numel)


def test_gaps_follow_the_geometric_law():
    torch.manual_seed(0)
    p, numel = 0.2, 500_000
    positions = bernoulli_positions(numel, p)
    gaps = torch.cat([positions[:1] + 1, positions.diff()])
    counts = torch.bincount(gaps, minlength=30)[1:30].double()
    k = torch.arange(1, 30, dtype=torch.float64)
    expected = len(gaps) * p * (1 - p) ** (k - 1)
    keep = expected > 20
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 60, chi2  # ~20 degrees of freedom: a fair law scores ~20


def test_same_seed_same_positions_and_positions_cover_the_end():
    torch.manual_seed(3)
    first = bernoulli_positions(1000, 0.5)
    torch.manual_seed(3)
    assert torch.equal(first, bernoulli_positions(1000, 0.5))
    # p close to 1: almost everything dropped, including the last element.
    assert bernoulli_positions(1000, 0.999).numel() > 990


def test_zero_dropped_and_dropped_copy():
    x = torch.arange(1.0, 13.0).view(3, 4)
    idx = torch.tensor([0, 5, 11])
    copy = dropped_copy(x, idx)
    assert torch.equal(copy, x.masked_fill(as_mask(idx, 12).view(3, 4), 0))
    assert x.count_nonzero() == 12, "dropped_copy must leave its input alone"
    assert dropped_copy(x, None) is x
    assert torch.equal(zero_dropped_(x.clone(), idx), copy)


def test_the_fused_backend_draws_only_in_training_and_scales_by_one_over_keep(monkeypatch):
    from torch import nn

    from loramoe import LoRAMoEConfig
    from loramoe.backends import fused
    from loramoe.layer import LoRAMoELinear

    seen = []
    real = fused.FusedLoRAMoE.apply
    monkeypatch.setattr(fused.FusedLoRAMoE, "apply",
                        lambda *args: seen.append((args[-2], args[-1])) or real(*args))
    layer = LoRAMoELinear(nn.Linear(8, 4), LoRAMoEConfig(dropout=0.1))
    x = torch.randn(4, 8)
    fused.FusedBackend()(layer.eval(), x)
    fused.FusedBackend()(layer.train(), x)
    (eval_scale, eval_dropped), (train_scale, train_dropped) = seen
    assert eval_dropped is None and eval_scale == layer.scaling
    assert train_dropped.dtype == torch.int64
    assert train_scale == pytest.approx(layer.scaling / 0.9)


def test_positions_dropout_is_dropout_scaled_by_one_over_keep_with_its_gradient():
    from loramoe.backends.dropout import PositionsDropout

    torch.manual_seed(0)
    p, dropout = 0.05, PositionsDropout(0.05)
    x = (torch.rand(400, 500) + 0.5).requires_grad_(True)  # no zeros of its own
    out = dropout(x)
    dropped = out == 0
    sd = math.sqrt(p * (1 - p) / x.numel())
    assert abs(dropped.double().mean().item() - p) < 5 * sd
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p))
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (~dropped).float() / (1 - p))
    assert dropout.eval()(x) is x or torch.equal(dropout(x), x)  # eval: the identity
    assert torch.equal(PositionsDropout(0.0).train()(x), x)


def test_the_lora_baseline_gets_positions_dropout_and_still_trains(tiny_llama):
    """The trainer's LoRA (PEFT) has its lora_dropout swapped, one per adapted layer, and the
    adapters still get gradients through it."""
    from loramoe.backends.dropout import PositionsDropout
    from loramoe.train import TrainConfig
    from loramoe.train.builders import add_adapters

    model = add_adapters(tiny_llama, TrainConfig(method="lora", lora_dropout=0.3))
    dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    adapted = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert len(dropouts) == len(adapted) > 0
    assert all(type(d) is PositionsDropout and d.p == 0.3 for d in dropouts)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 7))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # B = 0: A gets none
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
