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


def test_aligned_form_hand_computed_and_its_minimum_favours_own_type():
    probs, mask = two_sample_example()
    z = [1.3 / 1.1, 1.1 / 0.9, 0.7 / 0.9, 1.9 / 1.1]  # Z = Q ⊘ I, same Q and I as above
    loss = localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], delta=0.1,
                                    form="aligned")
    assert loss.item() == pytest.approx(cv2(z), rel=1e-12)
    delta = 0.1

    def loss_for(a: float, form: str) -> float:
        probs = torch.tensor([[[a, 1 - a]], [[1 - a, a]]], dtype=torch.float64)
        return localized_balancing_loss([probs], None, torch.tensor([0, 1]), [0, 1], delta,
                                        form=form).item()

    # minimum where own-type weight / other = (1+δ)/(1−δ): a = (1+δ)/2
    assert loss_for((1 + delta) / 2, "aligned") == pytest.approx(0.0, abs=1e-20)
    assert loss_for(0.5, "aligned") > loss_for(0.53, "aligned") > 0
    assert (1 + delta) / 2 > 0.5 > (1 - delta) / 2  # aligned above uniform, paper below


def cv2_gradient(z: list[float]) -> list[float]:
    """d(var/mean²)/dz_i by hand: var = Σ(z−μ)²/(n−1), so
    d/dz_i = 2(z_i − μ)/((n−1)μ²) − 2·var/(n·μ³)."""
    n, mean = len(z), sum(z) / len(z)
    var = sum((v - mean) ** 2 for v in z) / (n - 1)
    return [2 * (v - mean) / ((n - 1) * mean**2) - 2 * var / (n * mean**3) for v in z]


@pytest.mark.parametrize("form", ["paper", "aligned"])
def test_gradient_on_q_matches_the_hand_derivative(form):
    probs, mask = two_sample_example()
    probs.requires_grad_(True)
    coeff = {(0, 0): 1.1, (0, 1): 0.9, (1, 0): 0.9, (1, 1): 1.1}  # I[n, m]
    q = {(0, 0): 1.3, (0, 1): 1.1, (1, 0): 0.7, (1, 1): 1.9}  # Q[n, m]
    keys = list(q)
    scale = {k: coeff[k] if form == "paper" else 1 / coeff[k] for k in keys}
    grad_z = cv2_gradient([q[k] * scale[k] for k in keys])
    localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], 0.1,
                             form=form).backward()
    for (n, m), g in zip(keys, grad_z, strict=True):
        # dL/dprobs[m, t, n] = dL/dQ[n, m] = dL/dZ · scale, for each real token t
        assert probs.grad[m, 0, n].item() == pytest.approx(g * scale[(n, m)], rel=1e-10)
    assert probs.grad[0, 2].abs().sum().item() == 0  # padding: no gradient


@pytest.mark.parametrize(("form", "sign"), [("paper", -1), ("aligned", 1)])
def test_one_descent_step_from_uniform_moves_towards_or_away_from_own_type(form, sign):
    # Router logits of 2 samples (types 0, 1) over experts typed [0, 1], starting uniform.
    logits = torch.zeros(2, 4, 2, dtype=torch.float64, requires_grad=True)
    loss = localized_balancing_loss([logits.softmax(-1)], None, torch.tensor([0, 1]), [0, 1],
                                    0.1, form=form)
    loss.backward()
    with torch.no_grad():
        after = (logits - 1.0 * logits.grad).softmax(-1)
    own = torch.stack([after[0, :, 0], after[1, :, 1]])  # each sample's own-type weight
    assert (sign * (own - 0.5) > 1e-6).all()


def test_mean_load_divides_q_by_each_samples_tokens():
    probs, mask = two_sample_example()
    z = [1.3 / 2 * 1.1, 1.1 / 3 * 0.9, 0.7 / 2 * 0.9, 1.9 / 3 * 1.1]  # 2 and 3 real tokens
    loss = localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], delta=0.1,
                                    load="mean")
    assert loss.item() == pytest.approx(cv2(z), rel=1e-12)


def test_form_and_load_errors_name_the_choice():
    probs, mask = two_sample_example()
    with pytest.raises(ValueError, match="form must be one of"):
        localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], form="x")
    with pytest.raises(ValueError, match="load must be one of"):
        localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], load="max")
    with pytest.raises(ValueError, match="delta must be < 1"):
        localized_balancing_loss([probs], mask, torch.tensor([0, 1]), [0, 1], delta=1.0,
                                 form="aligned")
    from loramoe import ConfigError, LoRAMoEConfig

    with pytest.raises(ConfigError, match=r"LoRAMoEConfig.lbc_form: must be 'paper' or"):
        LoRAMoEConfig(lbc_form="literal")
    with pytest.raises(ConfigError, match=r"LoRAMoEConfig.lbc_delta: must be < 1 with"):
        LoRAMoEConfig(lbc_form="aligned", lbc_delta=1.0)


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
