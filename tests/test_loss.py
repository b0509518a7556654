"""The localized balancing constraint against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from loramoe import balance_loss, localized_balancing_loss, router_cv


def two_sample_example():
    """2 samples × 3 tokens × 2 experts; sample 0's last token is padding."""
    probs = torch.tensor(
        [
            [[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]],  # sample 0 (type 0); last row is padding
            [[0.2, 0.8], [0.5, 0.5], [0.4, 0.6]],  # sample 1 (type 1)
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return probs, mask


def cv2(values: list[float]) -> float:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return var / mean**2


def test_lbc_hand_computed_with_padding():
    probs, mask = two_sample_example()
    # Q[n, m]: expert 0 -> s0: 0.7+0.6 = 1.3, s1: 0.2+0.5+0.4 = 1.1
    #          expert 1 -> s0: 0.3+0.4 = 0.7, s1: 0.8+0.5+0.6 = 1.9
    # I (δ=0.1, experts typed [0, 1]): [[1.1, 0.9], [0.9, 1.1]]
    z = [1.3 * 1.1, 1.1 * 0.9, 0.7 * 0.9, 1.9 * 1.1]
    loss = localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], delta=0.1)
    assert loss.item() == pytest.approx(cv2(z), rel=1e-12)
    assert loss.item() == pytest.approx(0.2392365, rel=1e-6)  # 0.3950333 / 1.285**2


def test_padding_is_excluded_from_q():
    probs, mask = two_sample_example()
    with_pad = localized_balancing_loss([probs], None, torch.tensor([0, 1]), [0, 1])
    without = localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1])
    assert with_pad.item() != pytest.approx(without.item())


def test_delta_zero_is_plain_cv2_of_q():
    probs, mask = two_sample_example()
    loss = localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], delta=0.0)
    assert loss.item() == pytest.approx(cv2([1.3, 1.1, 0.7, 1.9]), rel=1e-12)


def test_untyped_samples_get_coefficient_one():
    probs, mask = two_sample_example()
    loss = localized_balancing_loss([probs], mask, torch.tensor([-1, 1]), [0, 1], delta=0.1)
    assert loss.item() == pytest.approx(cv2([1.3, 1.1 * 0.9, 0.7, 1.9 * 1.1]), rel=1e-12)


def test_three_types_and_layer_reduction():
    torch.manual_seed(0)
    layers = [torch.softmax(torch.randn(3, 4, 5, dtype=torch.float64), -1) for _ in range(2)]
    mask = torch.ones(3, 4)
    expert_types = [0, 0, 1, 2, 2]
    sample_types = torch.tensor([2, 0, 1])
    delta = 0.3
    per_layer = []
    for p in layers:
        z = []
        for n, etype in enumerate(expert_types):
            for m, stype in enumerate(sample_types.tolist()):
                coeff = 1 + delta if etype == stype else 1 - delta
                z.append(coeff * p[m, :, n].sum().item())
        per_layer.append(cv2(z))
    mean = localized_balancing_loss(layers, mask, sample_types, expert_types, delta)
    total = localized_balancing_loss(layers, mask, sample_types, expert_types, delta, "sum")
    assert mean.item() == pytest.approx(sum(per_layer) / 2, rel=1e-12)
    assert total.item() == pytest.approx(sum(per_layer), rel=1e-12)


def test_lbc_minimum_puts_less_weight_on_same_type_experts():
    """A property of the paper's formula (see docs/method.md): the loss is 0 exactly when
    Z = I∘Q is uniform, i.e. when each sample's weight on same-type experts is (1−δ)/(1+δ)
    times its weight on the other experts, not more."""
    delta = 0.1

    def loss_for(a: float) -> float:
        # Expert 0 is type 0, expert 1 type 1; sample m (type m) puts `a` on its own expert.
        probs = torch.tensor([[[a, 1 - a]], [[1 - a, a]]], dtype=torch.float64)
        return localized_balancing_loss([probs], None, torch.tensor([0, 1]), [0, 1], delta).item()

    minimiser = (1 - delta) / 2  # (1+δ)·a = (1−δ)·(1−a)
    assert loss_for(minimiser) == pytest.approx(0.0, abs=1e-20)
    assert loss_for(0.5) > 0
    assert loss_for(0.55) > loss_for(0.5) > loss_for(minimiser)


def test_balance_loss_and_router_cv():
    probs, mask = two_sample_example()
    importance = [1.3 + 1.1, 0.7 + 1.9]
    assert balance_loss([probs], mask).item() == pytest.approx(cv2(importance), rel=1e-12)
    assert router_cv([probs], mask).item() == pytest.approx(cv2(importance) ** 0.5, rel=1e-12)


def test_shape_errors_are_clear():
    probs, mask = two_sample_example()
    with pytest.raises(ValueError, match="expert_types has 3 entries"):
        localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1, 1])
    with pytest.raises(ValueError, match="sample_types has 1 entries"):
        localized_balancing_loss([probs], mask, torch.tensor([0]), [0, 1])
    with pytest.raises(ValueError, match="attention_mask shape"):
        localized_balancing_loss([probs], mask[:, :2], torch.tensor([0, 1]), [0, 1])
    with pytest.raises(ValueError, match="reduction"):
        localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], reduction="max")
