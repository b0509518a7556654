"""Expert dropout drawn as positions: the same law as independent Bernoulli(p) per element."""

from __future__ import annotations

import math

import pytest
import torch
from loramoe.dropout import ExpertDropout, bernoulli_positions, draw_dropped, zero_dropped_


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


def test_zero_dropped_takes_indices_or_a_mask():
    x = torch.arange(1.0, 13.0).view(3, 4)
    idx = torch.tensor([0, 5, 11])
    by_index = zero_dropped_(x.clone(), idx)
    by_mask = zero_dropped_(x.clone(), as_mask(idx, 12).view(3, 4))
    assert torch.equal(by_index, by_mask)
    assert by_index.flatten()[idx].eq(0).all() and by_index.count_nonzero() == 9


def test_expert_dropout_inactive_in_eval_or_at_zero():
    x = torch.randn(4, 8)
    dropout = ExpertDropout(0.1).eval()
    assert dropout(x) == (None, 1.0)
    assert ExpertDropout(0.0).train()(x) == (None, 1.0)
    dropped, scale = dropout.train()(x)
    assert scale == pytest.approx(1 / 0.9)
    assert dropped.dtype == torch.int64
    assert draw_dropped(torch.Size([4, 8]), 0.5, torch.device("meta")).dtype == torch.bool
