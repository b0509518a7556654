"""The chunked training loss (loramoe/backends/cross_entropy.py) against F.cross_entropy and a
hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loramoe.backends.cross_entropy import ChunkedCrossEntropy, cross_entropy_sum


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d logits) of the summed cross-entropy, autograd on F.cross_entropy in
    fp64."""
    x = logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(x, targets, reduction="sum")
    loss.backward()
    return loss.detach(), x.grad


def chunked(logits: torch.Tensor, targets: torch.Tensor, rows: int, scale: float = 1.0):
    x = logits.detach().clone().requires_grad_(True)
    loss = ChunkedCrossEntropy.apply(x, targets, rows)
    (loss * scale).backward()
    return loss.detach(), x.grad


def test_a_hand_computed_loss_and_gradient():
    logits = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(0.5)),
           math.log(math.exp(-1) + math.exp(0) + math.exp(3))]
    loss, grad = chunked(logits, targets, rows=1)
    assert loss.item() == pytest.approx((lse[0] - 2.0) + (lse[1] + 1.0), rel=1e-12)
    want = torch.tensor([[math.exp(v - lse[m]) for v in row] for m, row in
                         enumerate(logits.tolist())], dtype=torch.float64)
    want[0, 1] -= 1
    want[1, 0] -= 1
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3, 10, 64])  # several chunks, a partial last one, one
def test_fp64_matches_autograd_on_f_cross_entropy(rows):
    torch.manual_seed(0)
    logits = torch.randn(10, 37, dtype=torch.float64) * 4
    targets = torch.randint(0, 37, (10,))
    loss, grad = chunked(logits, targets, rows, scale=2.5)  # upstream gradient 2.5
    want_loss, want_grad = reference(logits, targets)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, 2.5 * want_grad, rtol=1e-12, atol=1e-12)


def test_bf16_logits_give_the_fp32_loss_and_a_bf16_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(50, 1000) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 1000, (50,))
    loss, grad = chunked(logits, targets, rows=7)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    want_loss, want_grad = reference(logits, targets)  # the same bf16 values, in fp64
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    # one bf16 rounding of each gradient entry (|g| <= 1: at most 2^-9 off)
    assert (grad.double() - want_grad).abs().max().item() <= 2 ** -9


def test_the_default_entry_point_equals_f_cross_entropy_under_autocast_too(monkeypatch):
    from loramoe.backends import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 4 * 500 * 64)  # 64-row chunks
    torch.manual_seed(1)
    logits = torch.randn(300, 500)
    targets = torch.randint(0, 500, (300,))
    want = F.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(cross_entropy_sum(logits, targets), want, rtol=1e-6, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # full SFT's forward
        got = cross_entropy_sum(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-3)


def test_no_tokens_give_zero_and_an_empty_gradient():
    logits = torch.zeros(0, 11, requires_grad=True)
    loss = cross_entropy_sum(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 11)


def test_the_trainers_loss_is_the_f_cross_entropy_loss(tiny_llama):
    """ResponseLM (what the trainer optimises) with the chunked loss gives F.cross_entropy's
    loss and gradients on a tiny model."""
    from loramoe.train.objective import ResponseLM

    torch.manual_seed(0)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens
    mask = torch.ones_like(ids)

    def run(cross_entropy):
        tiny_llama.zero_grad(set_to_none=True)
        model = ResponseLM(tiny_llama) if cross_entropy is None else ResponseLM(tiny_llama,
                                                                               cross_entropy)
        loss = model(ids, mask, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_llama.named_parameters()
                               if p.grad is not None}

    def plain(logits, targets):
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    loss, grads = run(None)
    want_loss, want_grads = run(plain)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
